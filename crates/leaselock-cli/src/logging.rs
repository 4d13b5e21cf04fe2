//! Logging to stderr through `tracing`, and the scrubbing of credentials from everything the
//! command prints.
//!
//! URLs are redacted structurally where they are displayed (see [`crate::target::redact`]); as a
//! second line of defence every password found in a URL is registered here, and every message,
//! log line and JSON document is scrubbed of it before it is written, so a driver error or a
//! backend's log line that quotes the connection string cannot leak it either.

use std::io::{self, IsTerminal, Write};
use std::sync::RwLock;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// Secrets shorter than this are not scrubbed from free text (they would mangle ordinary words);
/// URLs are still redacted structurally whatever the length.
const MIN_SCRUBBED_LEN: usize = 4;

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Registers a secret (a password, as written in a URL and decoded) to scrub from all output.
pub fn add_secret(secret: &str) {
    if secret.len() < MIN_SCRUBBED_LEN || secret == crate::target::MASK {
        return;
    }
    let mut secrets = SECRETS.write().unwrap_or_else(|p| p.into_inner());
    if !secrets.iter().any(|s| s == secret) {
        secrets.push(secret.to_owned());
        // Longest first, so a secret containing another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }
}

/// `text` with every registered secret replaced by `***`.
pub fn scrub(text: &str) -> String {
    let secrets = SECRETS.read().unwrap_or_else(|p| p.into_inner());
    let mut text = text.to_owned();
    for secret in secrets.iter() {
        if text.contains(secret.as_str()) {
            text = text.replace(secret.as_str(), crate::target::MASK);
        }
    }
    text
}

/// Prints `leaselock: MESSAGE` to stderr, scrubbed.
pub fn say(message: &str) {
    let line = scrub(&format!("leaselock: {message}\n"));
    let _ = io::stderr().lock().write_all(line.as_bytes());
}

/// Prints `text` to stdout, scrubbed, followed by a newline.
pub fn out(text: &str) {
    let mut line = scrub(text);
    line.push('\n');
    let _ = io::stdout().lock().write_all(line.as_bytes());
}

/// Installs the `tracing` subscriber: quiet (errors only) by default, `-v` info, `-vv` debug,
/// `-vvv` trace; `RUST_LOG` overrides. Everything goes to stderr, scrubbed.
pub fn init(verbose: u8) {
    let default = match verbose {
        0 => "error",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => {
            EnvFilter::try_new(spec).unwrap_or_else(|_| EnvFilter::new(default))
        }
        _ => EnvFilter::new(default),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(ScrubbingStderr)
        .with_ansi(io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// A `tracing` writer that scrubs secrets from each log line before writing it to stderr.
#[derive(Clone, Copy, Debug)]
struct ScrubbingStderr;

/// One log event's writer (the formatter writes a whole event in one call).
struct ScrubbingWriter;

impl Write for ScrubbingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        io::stderr().lock().write_all(scrub(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for ScrubbingStderr {
    type Writer = ScrubbingWriter;

    fn make_writer(&'a self) -> Self::Writer {
        ScrubbingWriter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrubs_registered_secrets() {
        add_secret("s3cr3t-pw");
        add_secret("ab"); // too short to scrub from free text
        assert_eq!(
            scrub("connect to u:s3cr3t-pw@host failed, ab"),
            "connect to u:***@host failed, ab"
        );
    }
}
