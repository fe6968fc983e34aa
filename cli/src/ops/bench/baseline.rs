//! The physical baselines the broker's figures are compared with: how many
//! durable SQLite commits this disk does per second, and how long a
//! `redis-server` takes from spawn to its first PONG.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{Connection, TransactionBehavior};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// How long the commit loop runs.
const COMMIT_RUN: Duration = Duration::from_secs(2);
/// How many redis-servers are timed (the median is reported).
const REDIS_RUNS: usize = 7;
/// A redis-server that has not answered PING by then is a failed run.
const REDIS_TIMEOUT: Duration = Duration::from_secs(10);

/// Durable commits per second in a scratch database under `dir`, set up as
/// the gateway's store is (WAL, synchronous=FULL), one single-row INSERT
/// per `BEGIN IMMEDIATE` transaction, one after another.
pub async fn sqlite_commits_per_s(dir: PathBuf) -> Result<f64, String> {
    tokio::task::spawn_blocking(move || commit_loop(&dir))
        .await
        .map_err(|e| format!("commit baseline thread: {e}"))?
}

fn commit_loop(dir: &Path) -> Result<f64, String> {
    let scratch = tempfile::Builder::new()
        .prefix("svcbroker-bench-")
        .tempdir_in(dir)
        .map_err(|e| {
            format!(
                "cannot create a scratch directory in {}: {e}",
                dir.display()
            )
        })?;
    let err = |e: rusqlite::Error| format!("sqlite baseline: {e}");
    let mut conn = Connection::open(scratch.path().join("baseline.sqlite")).map_err(err)?;
    conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))
        .map_err(err)?;
    conn.execute_batch(
        "PRAGMA synchronous = FULL;
         CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL) STRICT;",
    )
    .map_err(err)?;
    let start = Instant::now();
    let mut commits = 0u64;
    while start.elapsed() < COMMIT_RUN {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        tx.execute("INSERT INTO t (v) VALUES (?1)", [commits.to_string()])
            .map_err(err)?;
        tx.commit().map_err(err)?;
        commits += 1;
    }
    Ok(commits as f64 / start.elapsed().as_secs_f64())
}

/// How redis-server is started for the baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisPersistence {
    /// As the shipped redis service runs a new instance: `appendonly yes`
    /// in a fresh directory (redis creates and syncs its AOF files before
    /// it answers), so the baseline is the daemon's own start-up work.
    Aof,
    /// No persistence at all: the bare process start.
    None,
}

/// Median time from spawning `redis-server` on a free loopback port (in a
/// fresh directory each time) to its first PONG, in milliseconds; `Err`
/// when redis-server is not on PATH.
pub async fn redis_spawn_to_pong_ms(persistence: RedisPersistence) -> Result<f64, String> {
    let scratch = tempfile::Builder::new()
        .prefix("svcbroker-bench-redis-")
        .tempdir()
        .map_err(|e| format!("cannot create a scratch directory: {e}"))?;
    let mut runs = Vec::with_capacity(REDIS_RUNS);
    for i in 0..REDIS_RUNS {
        let dir = scratch.path().join(i.to_string());
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        runs.push(one_redis(&dir, persistence).await?);
    }
    runs.sort_by(f64::total_cmp);
    Ok(runs[runs.len() / 2])
}

async fn one_redis(dir: &Path, persistence: RedisPersistence) -> Result<f64, String> {
    let port = free_port()?;
    let aof = match persistence {
        RedisPersistence::Aof => "yes",
        RedisPersistence::None => "no",
    };
    let start = Instant::now();
    let mut child = tokio::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", aof, "--daemonize", "no"])
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start redis-server: {e}"))?;
    let result = tokio::time::timeout(REDIS_TIMEOUT, wait_pong(port)).await;
    let took = start.elapsed();
    let _ = child.kill().await;
    match result {
        Ok(()) => Ok(took.as_secs_f64() * 1e3),
        Err(_) => Err(format!(
            "redis-server on port {port} did not answer PING within {} s",
            REDIS_TIMEOUT.as_secs()
        )),
    }
}

/// Connects and PINGs until the answer is PONG, retrying every 200 µs.
async fn wait_pong(port: u16) {
    loop {
        if ping(port).await {
            return;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

async fn ping(port: u16) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if s.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf).await, Ok(n) if buf[..n].starts_with(b"+PONG"))
}

/// A port the kernel just gave out on loopback (it may be taken again
/// before redis-server binds it: a failed run then says so).
fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("cannot find a free port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}
