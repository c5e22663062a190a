//! The README's quick start, run as it stands: the first `sh` block after the `quick start`
//! marker goes to bash unchanged, from the repository's directory, and what it prints must be
//! what the README says it prints. Only where it installs to and where `mktemp` makes its
//! directory are pointed into the test's temp dir, so the test leaves nothing behind.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The quick start uses the default ports, as a new user would.
const DEFAULT_PORTS: [u16; 2] = [8080, 8443];

#[test]
fn the_readme_quick_start_works_as_pasted() {
    common::require_tools("the_readme_quick_start_works_as_pasted", &["curl", "bash"]);
    for port in DEFAULT_PORTS {
        assert!(
            TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} is in use; the quick start needs the default ports free"
        );
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let block = quick_start_block(&std::fs::read_to_string(manifest.join("README.md")).unwrap());
    let scratch = tempfile::tempdir().unwrap();
    let install_root = scratch.path().join("cargo");
    let path = format!(
        "{}:{}",
        install_root.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // The suite's own target directory, so the install reuses the release build the other
    // tests make instead of compiling everything again in a temp dir.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| manifest.join("target"));
    let mut child = Command::new("bash")
        .args(["-e", "-o", "pipefail", "-c", &block])
        .current_dir(manifest)
        .env("PATH", path)
        .env("CARGO_INSTALL_ROOT", &install_root)
        .env("CARGO_TARGET_DIR", target)
        .env("TMPDIR", scratch.path())
        .env_remove("SUPPRESSD_API_URL")
        .env_remove("SUPPRESSD_API")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let group = child.id();
    // The block starts a server in the background; whatever happens, nothing outlives the test.
    let _reaper = KillGroupOnDrop(group);
    let deadline = Instant::now() + Duration::from_secs(600);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the quick start did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the quick start failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    for expected in [
        r#"{"status":"ok"}"#,
        "lox24 enabled at /webhooks/lox24",
        r#""id":"ef58b437-1319-4b0c-961b-17214cf1cf32","status":"accepted""#,
        "+4911113333444: suppressed since 2025-09-14T11:35:48Z (1757849748 Unix time) — lox24 unsubscribe",
        "exit 1: suppressed, do not send",
        "+49301234567: not suppressed",
        "exit 0: safe to send",
    ] {
        assert!(
            stdout.contains(expected),
            "the quick start did not print {expected:?}:\n{stdout}\n{stderr}"
        );
    }
    assert!(
        install_root.join("bin/suppressd").exists(),
        "cargo install did not install into CARGO_INSTALL_ROOT"
    );
}

/// The first `sh` block after `<!-- quick start -->`.
fn quick_start_block(readme: &str) -> String {
    let after_marker = &readme[readme
        .find("<!-- quick start -->")
        .expect("README has no quick start marker")..];
    let start = after_marker
        .find("```sh\n")
        .expect("no sh block after the marker")
        + 6;
    let length = after_marker[start..]
        .find("```")
        .expect("unterminated block");
    after_marker[start..start + length].to_owned()
}

struct KillGroupOnDrop(u32);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0)])
            .stderr(Stdio::null())
            .status();
    }
}
