//! `tavernsim serve --demo` as a new user meets it: the built binary, the
//! curl commands it prints (run as pasted), and a real OpenAI client
//! library (the Python `openai` package) against it, streaming and not.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary serving `--demo` on a free loopback port; killed on drop.
struct Demo {
    child: Child,
    base: String,
    commands: Vec<String>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_demo() -> Demo {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tavernsim"))
        .args(["serve", "--demo", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the tavernsim binary starts");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let (mut base, mut commands) = (String::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(30);
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("tavernsim serve: proxy on ") {
            base = rest.split(',').next().unwrap().to_string();
        }
        if line.starts_with("curl ") || line.starts_with("TOKEN=") {
            commands.push(line.clone());
        }
        if line.starts_with("Ctrl-C") || Instant::now() > deadline {
            break;
        }
    }
    assert!(base.starts_with("http://127.0.0.1:"), "no address printed");
    // Keep reading stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Demo {
        child,
        base,
        commands,
    }
}

/// Skips a test whose tool is missing, unless TAVERNSIM_REQUIRE_CLIENTS is
/// set (as .ci/run does, after installing them): then it fails.
fn skip(why: &str) {
    assert!(
        std::env::var_os("TAVERNSIM_REQUIRE_CLIENTS").is_none(),
        "{why}, and TAVERNSIM_REQUIRE_CLIENTS is set"
    );
    println!("SKIPPED: {why}");
}

fn have(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn the_printed_curl_commands_work_when_pasted() {
    if !have("curl", "--version") || !have("bash", "--version") {
        skip("curl or bash is not installed");
        return;
    }
    let demo = start_demo();
    assert_eq!(demo.commands.len(), 6, "{:?}", demo.commands);
    let script = format!(
        "set -euo pipefail\n{}\n",
        demo.commands.join("\necho\necho ----\n")
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parts: Vec<&str> = text.split("----").collect();
    assert_eq!(parts.len(), 6, "{text}");
    assert!(
        parts[0].contains("\"handle\":\"demo\""),
        "login: {}",
        parts[0]
    );
    for (i, what) in [(2, "SillyTavern's route"), (3, "/v1"), (4, "/v1 streaming")] {
        assert!(parts[i].contains("fp="), "{what}: {}", parts[i]);
    }
    assert!(parts[4].contains("data: [DONE]"), "{}", parts[4]);
    assert!(
        parts[5].contains("tavernsim_upstream_attempts_total"),
        "{}",
        parts[5]
    );
}

#[test]
fn a_real_openai_client_works_against_serve_demo() {
    if !have("python3", "--version") {
        skip("python3 is not installed");
        return;
    }
    let probe = Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .unwrap();
    if !probe.status.success() {
        skip("the Python openai package is missing (python3 -m pip install openai)");
        return;
    }
    let demo = start_demo();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/openai_client.py"
    );
    let out = Command::new("python3")
        .args([script, &demo.base])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("OK openai"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
