//! Progress lines and the commands the steps run.

use std::ffi::OsStr;
use std::fmt;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// Where progress lines, and the output of the commands a step runs, go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    /// Also for the commands' stdout: for a caller whose stdout carries its result (`cargo
    /// xtask ort-path`) or its own log (`lmgrid up`).
    Stderr,
}

/// How the steps report: each line starts with `prefix` (e.g. `xtask: models:`) and goes to
/// `stream`.
#[derive(Debug, Clone)]
pub struct Progress {
    prefix: String,
    stream: Stream,
}

impl Progress {
    pub fn new(prefix: impl Into<String>, stream: Stream) -> Progress {
        Progress {
            prefix: prefix.into(),
            stream,
        }
    }

    /// Prints `prefix line`.
    pub fn line(&self, line: fmt::Arguments<'_>) {
        match self.stream {
            Stream::Stdout => println!("{} {line}", self.prefix),
            Stream::Stderr => eprintln!("{} {line}", self.prefix),
        }
    }

    /// Runs `command` with its output on this stream (stderr stays stderr), after a line
    /// `prefix step: running `COMMAND``, and fails, naming `step`, unless it succeeds.
    pub fn run(&self, step: &str, command: &mut Command) -> anyhow::Result<()> {
        let shown = show(command);
        self.line(format_args!("{step}: running `{shown}`"));
        if self.stream == Stream::Stderr {
            command.stdout(std::io::stderr());
        }
        // Nothing here is interactive, and CI runs without a terminal on stdin.
        let status = command
            .stdin(Stdio::null())
            .status()
            .with_context(|| format!("step `{step}` failed: could not start `{shown}`"))?;
        if !status.success() {
            bail!("step `{step}` failed: `{shown}` exited with {status}");
        }
        Ok(())
    }
}

/// A command line for humans: the program's file name, then the arguments.
pub fn show(command: &Command) -> String {
    let program = Path::new(command.get_program());
    let program = program.file_name().unwrap_or(program.as_os_str());
    std::iter::once(program)
        .chain(command.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `command` runs and exits successfully, with all its output discarded.
pub(crate) fn succeeds(command: &mut Command) -> bool {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_command_lines_without_directories() {
        let mut command = Command::new("/usr/bin/cargo");
        command.args(["fmt", "--all"]);
        assert_eq!(show(&command), "cargo fmt --all");
    }
}
