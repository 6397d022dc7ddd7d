//! Records the commit the binary is built from, for saved schedules.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    println!("cargo:rerun-if-env-changed=TAVERNSIM_COMMIT");
    if std::env::var_os("TAVERNSIM_COMMIT").is_some() {
        return;
    }
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    if !commit.is_empty() {
        println!("cargo:rustc-env=TAVERNSIM_COMMIT={commit}");
    }
}
