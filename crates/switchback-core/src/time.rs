//! PostgreSQL timestamps: microseconds since 2000-01-01 00:00:00 UTC.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;

/// Converts a PostgreSQL timestamp (µs since 2000-01-01 UTC) to a `SystemTime`.
pub fn pg_to_system_time(us: i64) -> SystemTime {
    let epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS);
    if us >= 0 {
        epoch + Duration::from_micros(us as u64)
    } else {
        epoch - Duration::from_micros(us.unsigned_abs())
    }
}

/// The current time as a PostgreSQL timestamp.
pub fn now_pg() -> i64 {
    system_time_to_pg(SystemTime::now())
}

pub fn system_time_to_pg(t: SystemTime) -> i64 {
    let epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS);
    match t.duration_since(epoch) {
        Ok(d) => d.as_micros() as i64,
        Err(e) => -(e.duration().as_micros() as i64),
    }
}

/// RFC 3339 with microseconds, UTC (`2026-11-22T04:52:54.123456Z`).
pub fn format_pg_timestamp(us: i64) -> String {
    humantime::format_rfc3339_micros(pg_to_system_time(us)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pg_epoch_formats() {
        assert_eq!(format_pg_timestamp(0), "2000-01-01T00:00:00.000000Z");
        assert_eq!(
            format_pg_timestamp(1_500_000),
            "2000-01-01T00:00:01.500000Z"
        );
        let now = now_pg();
        assert!((system_time_to_pg(pg_to_system_time(now)) - now).abs() <= 1);
    }
}
