//! The command's process tree: it never outlives the `leaselock` that holds its lock.
//!
//! `leaselock run` does not start the command itself. It starts a copy of its own binary in
//! supervisor mode (`leaselock __supervise`, "the shim"), as the leader of a new process group,
//! and the shim starts the command in that group. Every process the command starts (a `sh -c`,
//! `make`, `npm run` and their children) is in the group unless it leaves on purpose.
//!
//! - **Signals** that `leaselock` forwards go to the whole group (`killpg`). The shim catches
//!   them and lets the command act on its copy.
//! - **`leaselock` dies** (SIGKILL, the OOM killer, any signal it does not handle): the shim is
//!   told at once by a parent-death signal (Linux `PR_SET_PDEATHSIG`, set by the shim on itself,
//!   then re-checked against the parent's pid so a death before that call is not missed), and
//!   also notices within [`PARENT_POLL`] by watching its parent pid (every Unix). It then kills
//!   the group, and on Linux every process it adopted, with SIGKILL. The lock is gone at that
//!   moment (a session lock's connection closed with `leaselock`), so the work must stop now,
//!   not after a grace period.
//! - **The command exits**: processes it left running in its group (a `cmd &` in a script) would
//!   go on without the lock. On Linux the shim is a child subreaper, so they become its
//!   children; it sends them SIGTERM, then SIGKILL after the kill grace, and reaps them. Only
//!   then does it exit, with the command's status, and `leaselock` releases the lock.
//! - **A terminal**: when `leaselock` runs in the foreground of a terminal, the shim makes the
//!   command's group the terminal's foreground group before it starts the command (so an
//!   interactive command can read the terminal, and Ctrl-C reaches it directly), and hands the
//!   terminal back to `leaselock`'s group when it is done.
//!
//! This is written with `nix` and `signal-hook`, without `unsafe`: the parent-death signal is set
//! by the shim on itself (no `pre_exec` in a forked child).

use std::ffi::OsString;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{getpgrp, getpid, getppid, Pid};

/// The first argument that puts the binary in supervisor mode. Not a documented subcommand.
pub const SHIM_ARG: &str = "__supervise";

/// How often the shim also checks that its parent is alive, for systems without a parent-death
/// signal and as a backstop.
pub const PARENT_POLL: Duration = Duration::from_millis(100);

/// Exit code of the shim when it cannot start the command (as `leaselock` itself uses).
const CANNOT_RUN: u8 = crate::exit::CANNOT_RUN;

/// The signals `leaselock` forwards to the command's group: every signal whose default action
/// ends a process and that one process commonly sends another. The other terminating signals
/// (and SIGKILL) end `leaselock`, and the shim then ends the command.
pub const FORWARDED: &[Signal] = &[
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGALRM,
];

/// The signals this process inherited as ignored (`nohup` ignores SIGHUP). Such a signal is left
/// ignored by `leaselock` and the shim, so the command inherits it ignored too, as under
/// `nohup flock`.
pub fn inherited_ignored() -> Vec<Signal> {
    #[cfg(target_os = "linux")]
    {
        // `SigIgn:` in /proc/self/status is the mask of ignored signals (bit N-1 for signal N).
        let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
            return Vec::new();
        };
        let mask = status
            .lines()
            .find_map(|line| line.strip_prefix("SigIgn:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .unwrap_or(0);
        FORWARDED
            .iter()
            .copied()
            .filter(|sig| mask & (1u64 << (*sig as i32 - 1)) != 0)
            .collect()
    }
    #[cfg(not(target_os = "linux"))]
    {
        Vec::new()
    }
}

/// The forwarded signals less those inherited as ignored.
pub fn handled_signals() -> Vec<Signal> {
    let ignored = inherited_ignored();
    FORWARDED
        .iter()
        .copied()
        .filter(|sig| !ignored.contains(sig))
        .collect()
}

/// The binary to start as the shim: this very executable.
fn own_executable() -> std::io::Result<std::path::PathBuf> {
    // /proc/self/exe still works when the file was replaced or deleted during the run (an
    // upgrade), where the path current_exe() returns would not.
    let proc_exe = std::path::Path::new("/proc/self/exe");
    if proc_exe.exists() {
        return Ok(proc_exe.to_path_buf());
    }
    std::env::current_exe()
}

/// A command started under the shim, in its own process group.
pub struct Tree {
    shim: tokio::process::Child,
    group: Pid,
}

/// What to start.
pub struct Spec<'a> {
    /// The program and its arguments.
    pub program: &'a OsString,
    /// Its arguments.
    pub args: &'a [OsString],
    /// Variables to set in its environment.
    pub env: Vec<(&'static str, String)>,
    /// Variables to remove from its environment.
    pub env_remove: &'a [&'static str],
    /// How long processes the command leaves behind get between SIGTERM and SIGKILL.
    pub grace: Duration,
}

impl Tree {
    /// Starts the shim, which starts the command. Must be called from a thread that lives as long
    /// as the supervision (the parent-death signal is tied to the thread that started the shim):
    /// `leaselock` calls it from the runtime's main thread (`block_on`).
    pub fn spawn(spec: &Spec<'_>) -> std::io::Result<Self> {
        let mut command = tokio::process::Command::new(own_executable()?);
        command
            .arg0("leaselock")
            .arg(SHIM_ARG)
            .arg(getpid().to_string())
            .arg(spec.grace.as_millis().to_string())
            .arg("--")
            .arg(spec.program)
            .args(spec.args)
            .process_group(0)
            .kill_on_drop(false);
        for name in spec.env_remove {
            command.env_remove(name);
        }
        for (name, value) in &spec.env {
            command.env(name, value);
        }
        let shim = command.spawn()?;
        let pid = shim
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw)
            .ok_or_else(|| std::io::Error::other("the supervisor process has no pid"))?;
        Ok(Self { shim, group: pid })
    }

    /// Sends `sig` to every process of the command's group (the shim catches it).
    pub fn signal(&self, sig: Signal) {
        if let Err(e) = killpg(self.group, sig) {
            tracing::debug!(signal = sig.as_str(), %e, "could not signal the command's group (already gone?)");
        }
    }

    /// Waits until the shim exits: the command and every process it left are gone.
    pub async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.shim.wait().await
    }
}

// ---------------------------------------------------------------------------------------------
// The shim.
// ---------------------------------------------------------------------------------------------

/// The shim's arguments: `__supervise PARENT_PID GRACE_MS -- PROGRAM [ARGS…]`.
struct ShimArgs {
    parent: Pid,
    grace: Duration,
    program: OsString,
    args: Vec<OsString>,
}

fn parse_shim_args(args: &[OsString]) -> Option<ShimArgs> {
    let parent = args.first()?.to_str()?.parse::<i32>().ok()?;
    let grace = args.get(1)?.to_str()?.parse::<u64>().ok()?;
    if args.get(2)? != "--" {
        return None;
    }
    let (program, rest) = args.get(3..)?.split_first()?;
    Some(ShimArgs {
        parent: Pid::from_raw(parent),
        grace: Duration::from_millis(grace),
        program: program.clone(),
        args: rest.to_vec(),
    })
}

fn shim_say(message: &str) {
    eprintln!("leaselock: {message}");
}

/// Kills every process of the group and, on Linux, every process the shim adopted, then the
/// shim itself (it is in the group): `leaselock` is gone, and with it the lock.
fn kill_everything() -> ! {
    let me = getpid();
    for pid in adopted_or_grouped(me) {
        let _ = kill(pid, Signal::SIGKILL);
    }
    let _ = killpg(getpgrp(), Signal::SIGKILL);
    // Not reached: the group includes this process.
    std::process::exit(i32::from(crate::exit::SIGNALED) + Signal::SIGKILL as i32)
}

/// The processes that are the shim's children or in its group, the shim excepted (Linux; empty
/// elsewhere).
fn adopted_or_grouped(me: Pid) -> Vec<Pid> {
    #[cfg(target_os = "linux")]
    {
        let group = getpgrp();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<i32>().ok())
            else {
                continue;
            };
            if pid == me.as_raw() {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            if let Some((state, ppid, pgrp)) = parse_stat(&stat) {
                if state != 'Z' && (ppid == me.as_raw() || pgrp == group.as_raw()) {
                    found.push(Pid::from_raw(pid));
                }
            }
        }
        found
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = me;
        Vec::new()
    }
}

/// The state letter of process `pid` (`R`, `S`, `T` stopped, ...), where `/proc` tells.
fn process_state(pid: Pid) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|(state, _, _)| state)
}

/// State, parent pid and process group from a `/proc/PID/stat` line. The command name (field 2)
/// is in parentheses and may itself hold spaces and parentheses, so fields are counted from the
/// last `)`.
fn parse_stat(stat: &str) -> Option<(char, i32, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, ppid, pgrp))
}

/// The shim's `main`: `leaselock __supervise PARENT GRACE_MS -- PROGRAM [ARGS…]`.
pub fn shim_main(args: &[OsString]) -> ExitCode {
    // Only ever the leader of the group `leaselock run` made for it: the shim kills its own
    // group, which must never be someone else's (a shell script's, when run by hand).
    let Some(args) = parse_shim_args(args).filter(|_| getpgrp() == getpid()) else {
        shim_say("`__supervise` is internal to `leaselock run`");
        return ExitCode::from(crate::exit::USAGE);
    };
    // Catch every forwarded signal (so a signal meant for the command does not end the shim)
    // and SIGCHLD, before anything else: from here on no such signal can end the shim.
    let mut watched: Vec<i32> = handled_signals().iter().map(|s| *s as i32).collect();
    watched.extend([
        Signal::SIGCHLD as i32,
        Signal::SIGCONT as i32,
        Signal::SIGTSTP as i32,
    ]);
    let mut signals = match signal_hook::iterator::Signals::new(&watched) {
        Ok(signals) => signals,
        Err(e) => {
            shim_say(&format!("cannot handle signals: {e}"));
            kill_everything();
        }
    };
    // Told at once when `leaselock` dies (Linux), then checked: it may have died before this.
    #[cfg(target_os = "linux")]
    {
        let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
        // Adopt orphaned descendants, to stop and reap them before exiting.
        let _ = nix::sys::prctl::set_child_subreaper(true);
    }
    if getppid() != args.parent {
        kill_everything();
    }
    // The backstop: a thread that watches the parent pid, and the parent's state: while
    // `leaselock` is stopped (SIGSTOP, SIGTSTP) it cannot refresh the lease, so the command is
    // stopped too. `leaselock` continues it when it is continued and still holds the lock.
    let parent = args.parent;
    std::thread::spawn(move || {
        let mut stopped = false;
        loop {
            std::thread::sleep(PARENT_POLL);
            if getppid() != parent {
                kill_everything();
            }
            // `T` is a job-control stop; `t`, a debugger's or strace's stop at a system call,
            // is left alone (nothing would continue the command after it).
            let parent_stopped = process_state(parent) == Some('T');
            if parent_stopped && !stopped {
                for pid in adopted_or_grouped(getpid()) {
                    let _ = kill(pid, Signal::SIGSTOP);
                }
            }
            stopped = parent_stopped;
        }
    });

    let mut terminal = Terminal::take(args.parent);
    let mut command = std::process::Command::new(&args.program);
    command.args(&args.args);
    let child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            shim_say(&format!(
                "cannot run `{}`: {e}",
                args.program.to_string_lossy()
            ));
            terminal.give_back();
            return ExitCode::from(CANNOT_RUN);
        }
    };
    let command_pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    // The command is reaped below through waitpid; the std handle is not used again.
    drop(child);

    let mut status: Option<WaitStatus> = None;
    let mut stop_deadline: Option<Instant> = None;
    let mut killed = false;
    loop {
        // Reap everything that ended.
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(ended @ (WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _))) => {
                    if pid == command_pid {
                        status = Some(ended);
                    }
                }
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => {
                    // ECHILD: nothing left. On systems without a subreaper, processes left in
                    // the group are not the shim's children; they are not waited for.
                    if let Some(status) = status {
                        terminal.give_back();
                        return exit_like(status);
                    }
                    break;
                }
            }
        }
        if getppid() != args.parent {
            kill_everything();
        }
        if status.is_some() {
            let left = adopted_or_grouped(getpid());
            if left.is_empty() && cfg!(target_os = "linux") {
                // Zombies not yet reaped are still our children: loop until waitpid says none.
                if matches!(
                    waitpid(None, Some(WaitPidFlag::WNOHANG)),
                    Err(nix::errno::Errno::ECHILD)
                ) {
                    terminal.give_back();
                    return exit_like(status.unwrap_or(WaitStatus::StillAlive));
                }
            } else if !left.is_empty() {
                match stop_deadline {
                    None => {
                        shim_say(&format!(
                            "the command exited and left {} process{} running ({}); sending \
                             SIGTERM, SIGKILL in {}: nothing runs on after the lock is released",
                            left.len(),
                            if left.len() == 1 { "" } else { "es" },
                            left.iter()
                                .map(|p| p.to_string())
                                .collect::<Vec<_>>()
                                .join(", "),
                            crate::output::human_duration(args.grace)
                        ));
                        for pid in &left {
                            let _ = kill(*pid, Signal::SIGTERM);
                        }
                        stop_deadline = Some(Instant::now() + args.grace);
                    }
                    Some(deadline) if !killed && Instant::now() >= deadline => {
                        for pid in &left {
                            let _ = kill(*pid, Signal::SIGKILL);
                        }
                        killed = true;
                    }
                    Some(_) if killed => {
                        // Still there after SIGKILL: adopted ones become ours as their parents
                        // die; kill again.
                        for pid in &left {
                            let _ = kill(*pid, Signal::SIGKILL);
                        }
                    }
                    Some(_) => {}
                }
            }
        }
        // Wait for the next signal (SIGCHLD, a forwarded one, the parent's death) or a moment
        // while stopping leftovers.
        let received: Vec<i32> = if status.is_some() {
            std::thread::sleep(Duration::from_millis(20));
            signals.pending().collect()
        } else {
            signals.wait().collect()
        };
        for sig in received {
            if sig == Signal::SIGTSTP as i32 {
                // Ctrl-Z at the terminal reached the command's group: stop `leaselock` too, so
                // that the shell gets its prompt back (`fg` continues both).
                terminal.give_back();
                let _ = kill(args.parent, Signal::SIGTSTP);
            } else if sig == Signal::SIGCONT as i32 {
                // `leaselock` was continued and still holds the lock (it sends SIGCONT to the
                // group only then): take the terminal back if it is in the foreground, and
                // continue whatever stopped reading the terminal meanwhile.
                if terminal.retake(args.parent) {
                    let _ = killpg(getpgrp(), Signal::SIGCONT);
                }
            }
        }
    }
}

/// Ends the shim the way the command ended: its exit code, or the same signal (128+N for the
/// signals whose default action dumps core, to leave no core file of the shim).
fn exit_like(status: WaitStatus) -> ExitCode {
    match status {
        WaitStatus::Exited(_, code) => ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)),
        WaitStatus::Signaled(_, sig, _) => {
            let dumps_core = matches!(
                sig,
                Signal::SIGQUIT
                    | Signal::SIGILL
                    | Signal::SIGTRAP
                    | Signal::SIGABRT
                    | Signal::SIGBUS
                    | Signal::SIGFPE
                    | Signal::SIGSEGV
                    | Signal::SIGSYS
                    | Signal::SIGXCPU
                    | Signal::SIGXFSZ
            );
            if !dumps_core {
                let _ = signal_hook::low_level::emulate_default_handler(sig as i32);
            }
            ExitCode::from(crate::exit::SIGNALED.saturating_add(sig as u8))
        }
        _ => ExitCode::from(crate::exit::INTERNAL),
    }
}

/// The controlling terminal, when `leaselock` runs in its foreground: given to the command's
/// group for the run, handed back after (and around a Ctrl-Z).
struct Terminal {
    /// `leaselock`'s process group, to hand the terminal back to, once it was handed over.
    owner: Option<Pid>,
}

impl Terminal {
    fn take(parent: Pid) -> Self {
        let mut terminal = Self { owner: None };
        terminal.retake(parent);
        terminal
    }

    /// Makes the shim's group the terminal's foreground group if `leaselock`'s group is it
    /// (never steals it from the shell after a `bg`). Whether it did.
    fn retake(&mut self, parent: Pid) -> bool {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return false;
        }
        let Ok(parent_group) = nix::unistd::getpgid(Some(parent)) else {
            return false;
        };
        match nix::unistd::tcgetpgrp(&stdin) {
            Ok(foreground) if foreground == parent_group => {}
            _ => return false,
        }
        // A background group that sets the foreground gets SIGTTOU unless it blocks it.
        with_ttou_blocked(|| nix::unistd::tcsetpgrp(&stdin, getpgrp()));
        self.owner = Some(parent_group);
        true
    }

    fn give_back(&self) {
        let Some(owner) = self.owner else { return };
        let stdin = std::io::stdin();
        if nix::unistd::tcgetpgrp(&stdin) == Ok(getpgrp()) {
            with_ttou_blocked(|| nix::unistd::tcsetpgrp(&stdin, owner));
        }
    }
}

fn with_ttou_blocked(f: impl FnOnce() -> nix::Result<()>) {
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
    let mut ttou = SigSet::empty();
    ttou.add(Signal::SIGTTOU);
    let mut old = SigSet::empty();
    let blocked = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&ttou), Some(&mut old)).is_ok();
    if let Err(e) = f() {
        tracing::debug!(%e, "could not move the terminal's foreground group");
    }
    if blocked {
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines() {
        assert_eq!(
            parse_stat("1234 (sh) S 1 1234 1234 0 -1 4194560"),
            Some(('S', 1, 1234))
        );
        // A command name with spaces and parentheses.
        assert_eq!(parse_stat("77 (a) b (c)) Z 5 70 70 0"), Some(('Z', 5, 70)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn shim_arguments() {
        let args: Vec<OsString> = ["42", "1500", "--", "sh", "-c", "true"]
            .iter()
            .map(OsString::from)
            .collect();
        let parsed = parse_shim_args(&args).unwrap();
        assert_eq!(parsed.parent, Pid::from_raw(42));
        assert_eq!(parsed.grace, Duration::from_millis(1500));
        assert_eq!(parsed.program, "sh");
        assert_eq!(parsed.args, [OsString::from("-c"), OsString::from("true")]);
        assert!(parse_shim_args(&args[..3]).is_none(), "no program");
        assert!(parse_shim_args(&[OsString::from("x")]).is_none());
    }

    #[test]
    fn forwarded_signals_are_all_handled_unless_ignored() {
        // The test process ignores none of them (cargo does not run tests under nohup).
        let ignored = inherited_ignored();
        assert_eq!(handled_signals().len() + ignored.len(), FORWARDED.len());
    }
}
