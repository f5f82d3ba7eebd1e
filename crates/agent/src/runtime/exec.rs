//! `skiff internal-exec`: the first process of every instance. It joins
//! the instance's cgroups and network namespace, drops to the instance's
//! user, forbids gaining privileges again, and replaces itself with the
//! application, so the supervisor's child *is* the application.

use std::convert::Infallible;
use std::ffi::CString;
use std::path::PathBuf;

use nix::sched::{CloneFlags, setns};
use nix::unistd::{Gid, Uid, User, execvp, setgid, setgroups, setuid};

/// What `internal-exec` does, in order.
#[derive(Debug, Clone, Default)]
pub struct Exec {
    /// `cgroup.procs` files to join.
    pub cgroups: Vec<PathBuf>,
    /// A network namespace to enter (a bind-mounted nsfs file).
    pub netns: Option<PathBuf>,
    /// A user name or numeric uid; `None` keeps the current user.
    pub user: Option<String>,
    pub command: Vec<String>,
}

/// Exit codes like a shell's: 127 for a missing command, 126 otherwise.
#[derive(Debug)]
pub struct ExecError {
    pub code: i32,
    pub message: String,
}

/// Does everything and execs; returns only on failure.
pub fn exec(e: &Exec) -> Result<Infallible, ExecError> {
    let fail = |message: String| ExecError { code: 126, message };
    let pid = std::process::id().to_string();
    for procs in &e.cgroups {
        std::fs::write(procs, &pid)
            .map_err(|err| fail(format!("cannot join cgroup {}: {err}", procs.display())))?;
    }
    if let Some(ns) = &e.netns {
        let f = std::fs::File::open(ns).map_err(|err| {
            fail(format!(
                "cannot open network namespace {}: {err}",
                ns.display()
            ))
        })?;
        setns(&f, CloneFlags::CLONE_NEWNET).map_err(|err| {
            fail(format!(
                "cannot enter network namespace {}: {err}",
                ns.display()
            ))
        })?;
    }
    if let Some(user) = &e.user {
        let (uid, gid) = resolve(user).map_err(fail)?;
        setgroups(&[gid]).map_err(|err| fail(format!("setgroups: {err}")))?;
        setgid(gid).map_err(|err| fail(format!("setgid {gid}: {err}")))?;
        setuid(uid).map_err(|err| fail(format!("setuid {uid}: {err}")))?;
    }
    nix::sys::prctl::set_no_new_privs().map_err(|err| fail(format!("no_new_privs: {err}")))?;
    let argv: Vec<CString> = e
        .command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|_| fail("the command contains a NUL byte".into()))?;
    let Some(program) = argv.first() else {
        return Err(fail("no command given".into()));
    };
    match execvp(program, &argv) {
        Err(nix::errno::Errno::ENOENT) => Err(ExecError {
            code: 127,
            message: format!("command `{}` not found", e.command[0]),
        }),
        Err(nix::errno::Errno::EACCES) => Err(fail(format!(
            "command `{}` is not executable by this user",
            e.command[0]
        ))),
        Err(err) => Err(fail(format!("cannot run `{}`: {err}", e.command[0]))),
        Ok(never) => match never {},
    }
}

/// A user name or uid to (uid, primary gid).
fn resolve(user: &str) -> Result<(Uid, Gid), String> {
    let found = match user.parse::<u32>() {
        Ok(n) => User::from_uid(Uid::from_raw(n)),
        Err(_) => User::from_name(user),
    };
    match found {
        Ok(Some(u)) => Ok((u.uid, u.gid)),
        // A bare uid with no passwd entry runs with the group of the same number.
        Ok(None) => match user.parse::<u32>() {
            Ok(n) => Ok((Uid::from_raw(n), Gid::from_raw(n))),
            Err(_) => Err(format!("no user `{user}` on this node")),
        },
        Err(e) => Err(format!("cannot look up user `{user}`: {e}")),
    }
}
