//! The systemd unit and the Debian package: the unit's hardening score, `systemd-analyze verify`
//! against the installed files, the package's contents, and install / remove / purge into a
//! scratch root.
//!
//! These need `systemd-analyze`, `man`, `dpkg` and `cargo-deb`, which `.ci/run` installs; a missing
//! tool fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::require_tools;

const PACKAGE: &str = "suppressd";

fn run(command: &mut Command) -> String {
    let output = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{command:?} failed:\n{text}");
    text
}

#[test]
fn unit_security_exposure_is_at_most_1_5() {
    require_tools(
        "unit_security_exposure_is_at_most_1_5",
        &["systemd-analyze"],
    );
    let report = run(Command::new("systemd-analyze").args([
        "security",
        "--offline=yes",
        "--no-pager",
        "systemd/suppressd.service",
    ]));
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall score in:\n{report}"));
    println!("{line}");
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
    assert!(score <= 1.5, "exposure {score} > 1.5:\n{report}");
}

/// Builds the package, checks what it holds, installs it into a scratch root, verifies the
/// installed unit, and shows that remove keeps the data while purge deletes it.
#[test]
fn package_installs_verifies_and_purges_in_a_scratch_root() {
    let tools = ["cargo-deb", "dpkg", "dpkg-deb", "systemd-analyze", "man"];
    require_tools(
        "package_installs_verifies_and_purges_in_a_scratch_root",
        &tools,
    );
    let out = tempfile::tempdir().unwrap();
    let deb = out.path().join("suppressd.deb");
    run(Command::new("packaging/build-deb.sh")
        .env("PROFILE", "dev")
        .arg("--fast")
        .arg("--output")
        .arg(&deb));

    let contents = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for path in [
        "./usr/bin/suppressd",
        "./lib/systemd/system/suppressd.service",
        "./usr/share/man/man1/suppressd.1.gz",
        "./usr/share/man/man1/suppressd-serve.1.gz",
        "./usr/share/bash-completion/completions/suppressd",
        "./usr/share/zsh/vendor-completions/_suppressd",
        "./usr/share/fish/vendor_completions.d/suppressd.fish",
        "./usr/share/doc/suppressd/examples/override.conf",
        "./usr/share/doc/suppressd/examples/certbot-deploy-hook",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(path)),
            "{path} missing from the package:\n{contents}"
        );
    }
    assert!(
        !contents.contains("multi-user.target.wants"),
        "the package must not enable the service"
    );

    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    for dir in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "etc"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    std::fs::write(root.join("etc/gshadow"), "root:*::\n").unwrap();
    let dpkg = |args: &[&str]| {
        let mut command = Command::new("dpkg");
        command
            .arg(format!("--root={}", root.display()))
            .args([
                "--force-script-chrootless",
                "--force-depends",
                "--log=/dev/null",
            ])
            // Slim container images exclude man pages in dpkg.cfg.d; verify needs them.
            .arg("--path-include=/usr/share/man/*")
            .args(args);
        command
    };
    run(dpkg(&["--install"]).arg(&deb));

    let version = run(Command::new(root.join("usr/bin/suppressd")).arg("--version"));
    assert!(version.starts_with("suppressd "), "{version}");
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap();
    assert!(group.contains("\nsuppressd-tls:"), "{group}");
    let tls_dir = std::fs::metadata(root.join("etc/suppressd/tls")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&tls_dir.permissions()) & 0o777,
        0o750
    );

    // verify needs the unit's binary and man page where the unit names them; point both at
    // the scratch root's copies.
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/suppressd.service")).unwrap();
    let unit_dir = tempfile::tempdir().unwrap();
    let unit_path = unit_dir.path().join("suppressd.service");
    let installed_binary = root.join("usr/bin/suppressd");
    std::fs::write(
        &unit_path,
        unit.replace(
            "/usr/bin/suppressd",
            &installed_binary.display().to_string(),
        ),
    )
    .unwrap();
    run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .env("MANPATH", root.join("usr/share/man")));

    // remove keeps the data, purge deletes it.
    let state = root.join("var/lib/private/suppressd");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("db"), "data").unwrap();
    std::os::unix::fs::symlink("private/suppressd", root.join("var/lib/suppressd")).unwrap();
    run(&mut dpkg(&["--remove", PACKAGE]));
    assert!(!root.join("usr/bin/suppressd").exists());
    assert!(state.join("db").exists(), "remove must keep the data");
    run(&mut dpkg(&["--purge", PACKAGE]));
    assert!(!state.exists(), "purge must delete the data");
    assert!(std::fs::symlink_metadata(root.join("var/lib/suppressd")).is_err());
}
