//! Exclusive blocks of TCP ports for one test process.
//!
//! Every test stack runs its own allocator, so two stacks in parallel test
//! processes would lease the same ports to different redis-servers. Each
//! stack therefore takes a block of ports that no other test process holds,
//! marked by an advisory lock on a file (released by the kernel when the
//! process dies, so a killed test never leaves a stale block behind).

use std::fs::{File, OpenOptions};
use std::path::PathBuf;

/// First port handed out; below the usual Linux ephemeral range
/// (32768..=60999), where `127.0.0.1:0` listeners and outgoing connections
/// would otherwise collide with instance ports.
const FIRST: u16 = 20_000;
/// One past the last port handed out.
const END: u16 = 32_000;
/// Ports per block.
pub const BLOCK: u16 = 128;
/// Ports at the end of each block kept for processes that must listen on a
/// fixed port across restarts (a gateway child process).
pub const RESERVED: u16 = 8;

/// A block of ports held by this process until dropped.
#[derive(Debug)]
pub struct PortBlock {
    start: u16,
    _lock: File,
}

impl PortBlock {
    /// Takes a free block, trying every block once, starting at one derived
    /// from the process id so that parallel test processes rarely contend.
    pub fn acquire() -> PortBlock {
        let dir = lock_dir();
        std::fs::create_dir_all(&dir).expect("create port lock directory");
        let blocks = (END - FIRST) / BLOCK;
        let first = (std::process::id() % u32::from(blocks)) as u16;
        for i in 0..blocks {
            let n = (first + i) % blocks;
            let path = dir.join(format!("block-{n}.lock"));
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            // flock semantics: a second open file in the same process
            // conflicts too, so two stacks in one test get two blocks.
            if file.try_lock().is_ok() {
                return PortBlock {
                    start: FIRST + n * BLOCK,
                    _lock: file,
                };
            }
        }
        panic!("no free block of test ports in {FIRST}..{END}");
    }

    /// Returns the inclusive range instances may be given.
    pub fn instance_range(&self) -> (u16, u16) {
        (self.start, self.start + BLOCK - RESERVED - 1)
    }

    /// Returns reserved port `i` (`i < RESERVED`).
    pub fn reserved(&self, i: u16) -> u16 {
        assert!(i < RESERVED, "only {RESERVED} reserved ports per block");
        self.start + BLOCK - RESERVED + i
    }
}

fn lock_dir() -> PathBuf {
    std::env::temp_dir().join("svcbroker-test-ports")
}
