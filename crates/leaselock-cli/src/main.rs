//! `leaselock`: run any command under a distributed lock, show and break locks.
//!
//! A distributed flock(1): `leaselock run KEY -- COMMAND` acquires the lock KEY in a database
//! (by default an SQLite file in the current directory), runs the command while keeping the
//! lease refreshed, and releases it. `status`, `list` and `release --force` show and break
//! locks; `init` and `check` prepare and verify the storage; `key` shows the database's own name
//! for a lock. See the crate README for usage and the exit-code table (also printed by
//! `leaselock --help`).
#![forbid(unsafe_code)]

mod cli;
mod commands;
mod exit;
mod logging;
mod output;
mod run;
mod target;
mod tree;

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::Parser;

fn main() -> ExitCode {
    // `leaselock run` starts the command through a copy of this binary (see `tree`).
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|arg| arg == tree::SHIM_ARG) {
        return tree::shim_main(&args[2..]);
    }
    register_url_secrets();
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return clap_failure(&error),
    };
    logging::init(cli.verbose);
    let url = match target::StorageUrl::resolve(cli.url.as_deref(), cli.url_file.as_deref()) {
        Ok(url) => url,
        Err(failure) => {
            logging::say(&failure.message);
            return ExitCode::from(failure.code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            logging::say(&format!("cannot start the async runtime: {e}"));
            return ExitCode::from(exit::INTERNAL);
        }
    };
    let code = runtime.block_on(commands::dispatch(cli, url));
    // Do not wait long for stray blocking work (a backend call abandoned by an interrupt).
    runtime.shutdown_timeout(Duration::from_secs(2));
    ExitCode::from(code)
}

/// Registers the secrets of any URL given on the command line or in `LEASELOCK_URL` before
/// parsing, so not even a parse error can print them.
fn register_url_secrets() {
    if let Some(url) = std::env::var_os("LEASELOCK_URL") {
        target::register_secrets(&url.to_string_lossy());
    }
    let args: Vec<OsString> = std::env::args_os().collect();
    for (i, arg) in args.iter().enumerate() {
        let arg = arg.to_string_lossy();
        if let Some(url) = arg.strip_prefix("--url=") {
            target::register_secrets(url);
        } else if arg == "--url" {
            if let Some(url) = args.get(i + 1) {
                target::register_secrets(&url.to_string_lossy());
            }
        } else if arg.contains("://") {
            target::register_secrets(&arg);
        }
    }
}

/// Help and version go to stdout (exit 0); any other parse error becomes one line on stderr with
/// exit code 2.
fn clap_failure(error: &clap::Error) -> ExitCode {
    match error.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = error.print();
            let code = if error.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                exit::USAGE
            } else {
                exit::OK
            };
            ExitCode::from(code)
        }
        _ => {
            let rendered = error.render().to_string();
            // clap's message is the first paragraph; the usage and hints follow a blank line.
            let first: Vec<&str> = rendered
                .lines()
                .take_while(|line| !line.trim().is_empty())
                .map(str::trim)
                .collect();
            let message = first.join(" ");
            let message = message.strip_prefix("error: ").unwrap_or(&message);
            let hint = if error.kind() == ErrorKind::UnknownArgument
                && std::env::args_os().any(|a| a == "run")
            {
                "the command to run goes after `--`; see `leaselock run --help`"
            } else {
                "see `leaselock --help`"
            };
            logging::say(&format!("{} ({hint})", exit::one_line(message)));
            ExitCode::from(exit::USAGE)
        }
    }
}
