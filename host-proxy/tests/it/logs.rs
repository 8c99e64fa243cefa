//! The daemon's log lines: plain text when stderr is not a terminal (no
//! colour codes in journald or files), and `--log-format json` one object
//! per line with stable field names.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Starts the agent (HTTP only) with `format`, returns the stderr lines up
/// to and including the one announcing the HTTP listener.
fn agent_log_lines(format: &str) -> Vec<String> {
    let tokens = tempfile::tempdir().unwrap();
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_keystore-host"))
        .args(["--log-format", format, "--enclave", "tcp://127.0.0.1:9"])
        .args([
            "agent",
            "--no-agent-socket",
            "--agent-http",
            "tcp://127.0.0.1:0",
        ])
        .arg("--tokens")
        .arg(tokens.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no 'agent HTTP' line; got {lines:#?}"));
        let done = line.contains("agent HTTP");
        lines.push(line);
        if done {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    lines
}

#[test]
fn text_logs_carry_no_colour_codes_off_a_terminal() {
    let lines = agent_log_lines("text");
    assert!(lines.len() >= 2, "{lines:#?}");
    for line in &lines {
        assert!(!line.contains('\u{1b}'), "ANSI escape in {line:?}");
    }
    assert!(lines.iter().any(|l| l.contains("INFO")), "{lines:#?}");
}

#[test]
fn json_logs_are_one_object_per_line_with_stable_fields() {
    let lines = agent_log_lines("json");
    for line in &lines {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        for field in ["timestamp", "level", "target", "fields"] {
            assert!(value.get(field).is_some(), "{field} missing in {line}");
        }
    }
    let http = lines.last().unwrap();
    let value: serde_json::Value = serde_json::from_str(http).unwrap();
    assert_eq!(value["level"], "INFO");
    assert_eq!(value["fields"]["message"], "agent HTTP");
    assert!(
        value["fields"]["endpoint"]
            .as_str()
            .unwrap()
            .starts_with("tcp://127.0.0.1:")
    );
}
