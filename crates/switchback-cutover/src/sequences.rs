//! Sequence sync, forward only: every sequence in scope (matched by [tables], or
//! owned by a table in scope: serial and identity columns) gets, on the new
//! primary, `max(its value, old primary's last_value + margin)`. A sequence is
//! never moved backwards (for a descending sequence "forward" is downwards).

use switchback_config::Config;
use switchback_core::quote_ident;
use switchback_pg::hub::Session;

use crate::mapping::target_sequence;
use crate::state::SequenceMove;
use crate::CutoverError;

struct SourceSeq {
    schema: String,
    name: String,
    last_value: i64,
    increment: i64,
}

async fn source_sequences(cfg: &Config, s: &Session) -> Result<Vec<SourceSeq>, CutoverError> {
    let rows = s
        .client
        .query(
            "SELECT s.schemaname::text, s.sequencename::text, s.last_value, s.increment_by, \
                    tn.nspname::text, t.relname::text \
             FROM pg_sequences s \
             JOIN pg_namespace n ON n.nspname = s.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = s.sequencename \
             LEFT JOIN pg_depend d ON d.objid = c.oid AND d.classid = 'pg_class'::regclass \
                  AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') \
             LEFT JOIN pg_class t ON t.oid = d.refobjid \
             LEFT JOIN pg_namespace tn ON tn.oid = t.relnamespace \
             WHERE s.last_value IS NOT NULL \
             ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(|e| s.err(e))?;
    let mut out: Vec<SourceSeq> = Vec::new();
    for r in rows {
        let schema: String = r.get(0);
        let name: String = r.get(1);
        let owner_schema: Option<String> = r.get(4);
        let owner: Option<String> = r.get(5);
        let in_scope = cfg.tables.matches(&schema, &name)
            || matches!((&owner_schema, &owner), (Some(os), Some(o)) if cfg.tables.matches(os, o));
        if in_scope && !out.iter().any(|q| q.schema == schema && q.name == name) {
            out.push(SourceSeq {
                schema,
                name,
                last_value: r.get(2),
                increment: r.get(3),
            });
        }
    }
    Ok(out)
}

/// Moves the new primary's sequences forward; returns those it moved. A sequence
/// missing on the target is an error naming it.
pub async fn sync(
    cfg: &Config,
    source: &Session,
    target: &Session,
) -> Result<Vec<SequenceMove>, CutoverError> {
    let margin = cfg.cutover.sequence_margin;
    let mut moved = Vec::new();
    for q in source_sequences(cfg, source).await? {
        let (ts, tn) = target_sequence(&q.schema, &q.name);
        let qualified = format!("{}.{}", quote_ident(&ts), quote_ident(&tn));
        let row = target
            .client
            .query_opt(
                &format!(
                    "SELECT q.last_value, q.is_called, s.min_value, s.max_value \
                     FROM {qualified} q, pg_sequences s \
                     WHERE s.schemaname = $1 AND s.sequencename = $2"
                ),
                &[&ts, &tn],
            )
            .await
            .map_err(|e| {
                CutoverError::Failed(format!(
                    "sequence {ts}.{tn} cannot be read on the new primary ({}): {}. Fix: create it \
                     there (same name), or exclude its table with [tables] exclude",
                    target.endpoint,
                    switchback_pg::error::describe_sql_error(&e)
                ))
            })?
            .ok_or_else(|| {
                CutoverError::Failed(format!(
                    "sequence {ts}.{tn} is not visible in pg_sequences on the new primary ({})",
                    target.endpoint
                ))
            })?;
        let (last, called, min, max): (i64, bool, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let ascending = q.increment > 0;
        // The value the next nextval() would be past.
        let current = if called { last } else { last - q.increment };
        let wanted = if ascending {
            q.last_value.saturating_add(margin).min(max)
        } else {
            q.last_value.saturating_sub(margin).max(min)
        };
        let behind = if ascending {
            current < wanted
        } else {
            current > wanted
        };
        if behind {
            target
                .client
                .query_one(
                    &format!(
                        "SELECT setval({}::regclass, $1, true)",
                        switchback_core::quote_literal(&qualified)
                    ),
                    &[&wanted],
                )
                .await
                .map_err(|e| target.err(e))?;
            moved.push(SequenceMove {
                sequence: format!("{ts}.{tn}"),
                from: current,
                to: wanted,
            });
        }
    }
    Ok(moved)
}
