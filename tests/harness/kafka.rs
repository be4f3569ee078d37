//! A throwaway Kafka-compatible broker (tansu, memory storage) for the Kafka tests.
//!
//! * [`kafka_broker()`]: one shared broker per test binary, started on first use;
//!   every test uses its own topic (the pipeline name derives it).
//! * [`Broker::dedicated`]: a private broker the test may freeze (SIGSTOP), or
//!   restart with its data wiped (memory storage forgets everything).
//!
//! Like the clusters, every broker has a reaper that kills it when the test
//! process ends, however it ends.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::{free_port, scratch_root, send_signal, unique, wait_until, Reaper};

/// The tansu binary: `$SWITCHBACK_TANSU`, `tansu` on PATH, or `~/.cargo/bin/tansu`.
pub fn tansu_bin() -> PathBuf {
    if let Ok(b) = std::env::var("SWITCHBACK_TANSU") {
        return PathBuf::from(b);
    }
    if let Ok(out) = Command::new("sh").args(["-c", "command -v tansu"]).output() {
        let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !p.is_empty() {
            return PathBuf::from(p);
        }
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let p = PathBuf::from(home).join(".cargo/bin/tansu");
    assert!(
        p.exists(),
        "tansu not found (install it: cargo install tansu --locked --features dynostore)"
    );
    p
}

/// librdkafka properties the tests need with tansu 0.6: it serves a fetch from
/// the first record batch whose base offset is at or after the requested offset
/// (skipping the rest of the batch holding it) and reports the high watermark as
/// the last batch's base offset + 1. With one message per batch both are right.
/// Real Kafka brokers need none of this.
pub fn tansu_properties() -> Vec<(String, String)> {
    vec![("batch.num.messages".into(), "1".into())]
}

/// A tansu broker on a loopback port.
pub struct Broker {
    port: u16,
    child: Mutex<Option<Child>>,
    pidfile: PathBuf,
    log: PathBuf,
    reaper: Mutex<Reaper>,
}

/// The broker shared by the tests of this process.
pub fn kafka_broker() -> &'static Broker {
    static B: OnceLock<Broker> = OnceLock::new();
    B.get_or_init(Broker::dedicated)
}

impl Broker {
    /// Starts a private broker (killed on drop).
    pub fn dedicated() -> Broker {
        let port = free_port();
        let n = unique();
        // Not under the scratch root: its own reaper may remove that first.
        let pidfile = std::env::temp_dir().join(format!(
            "switchback-tansu-{}-{port}-{n}.pid",
            std::process::id()
        ));
        let log = scratch_root().join(format!("tansu-{port}-{n}.log"));
        let reaper = Reaper::spawn(
            "kill -9 $(cat \"$1\" 2>/dev/null) 2>/dev/null; rm -f \"$1\"",
            &[pidfile.to_str().unwrap()],
        );
        let b = Broker {
            port,
            child: Mutex::new(None),
            pidfile,
            log,
            reaper: Mutex::new(reaper),
        };
        b.start();
        b
    }

    fn start(&self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("tansu log");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn tansu");
        std::fs::write(&self.pidfile, child.id().to_string()).expect("write pidfile");
        *self.child.lock().unwrap() = Some(child);
        let port = self.port;
        wait_until(Duration::from_secs(30), "tansu to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// `host:port` for `[queue] brokers`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().as_ref().map_or(0, |c| c.id())
    }

    /// SIGSTOP: the broker stops answering, connections stay open.
    pub fn freeze(&self) {
        assert!(send_signal(self.pid(), "STOP"));
    }

    /// SIGCONT after [`freeze`](Self::freeze).
    pub fn thaw(&self) {
        assert!(send_signal(self.pid(), "CONT"));
    }

    /// kill -9, then a new broker on the same port: memory storage starts empty.
    pub fn restart_wiped(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.start();
    }

    /// The broker's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let v: Vec<&str> = s.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    /// Config lines for the `[queue]` section of a pipeline on this broker; they
    /// end with the `[queue.kafka]` table (put other tables after them).
    pub fn queue_toml(&self) -> String {
        let mut s = format!(
            "kind = \"kafka\"\nbrokers = \"{}\"\nreplication_factor = 1\n[queue.kafka]\n",
            self.addr()
        );
        for (k, v) in tansu_properties() {
            s.push_str(&format!("{k:?} = {v:?}\n"));
        }
        s
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.reaper.lock().unwrap().run_now();
    }
}
