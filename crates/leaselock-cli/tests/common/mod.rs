//! What the CLI's integration tests share: the binary, a started process whose output goes to
//! files, and what it left when it finished.
//!
//! Output goes to files, not pipes: an orphaned grandchild holding a pipe open would block the
//! reader.
#![allow(dead_code)] // Each test file uses a part.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `leaselock` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_leaselock");

/// Only a bound against hangs; nothing should come close.
pub const TIMEOUT: Duration = Duration::from_secs(180);

/// A finished process.
#[derive(Debug)]
pub struct Done {
    /// Its exit code, `None` when a signal ended it.
    pub code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Done {
    /// Stdout as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.stdout))
    }
}

/// A running process, its stdout and stderr going to files.
pub struct Proc {
    pub child: Child,
    pub out: PathBuf,
    pub err: PathBuf,
}

impl Proc {
    /// Starts `command` with stdout and stderr to `out` and `err`.
    pub fn start(mut command: Command, out: PathBuf, err: PathBuf) -> Self {
        command
            .stdout(fs::File::create(&out).expect("stdout file"))
            .stderr(fs::File::create(&err).expect("stderr file"));
        Self {
            child: command.spawn().expect("spawn leaselock"),
            out,
            err,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for it (at most [`TIMEOUT`], then kills it and fails).
    pub fn wait(mut self) -> Done {
        use std::os::unix::process::ExitStatusExt;
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "leaselock did not finish within {TIMEOUT:?}; stderr: {}",
                    fs::read_to_string(&self.err).unwrap_or_default()
                );
            }
            sleep(Duration::from_millis(10));
        };
        Done {
            code: status.code(),
            signal: status.signal(),
            stdout: fs::read_to_string(&self.out).unwrap_or_default(),
            stderr: fs::read_to_string(&self.err).unwrap_or_default(),
        }
    }

    /// Sends `kill -SIG` (a name such as `TERM`).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig}");
    }

    /// SIGKILL, as a crash would.
    pub fn kill_hard(mut self) {
        self.child.kill().expect("kill -9 leaselock");
        self.child.wait().expect("reap leaselock");
    }
}

/// `url` with `params` added to its query.
pub fn with_params(url: &str, params: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{params}")
}
