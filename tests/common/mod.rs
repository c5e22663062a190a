//! Test kit: starts the real `suppressd` binary on ephemeral loopback ports with a certificate
//! generated for the test and a sled database in a temp dir, and talks to it over real HTTPS
//! (webhooks) and HTTP (API).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

pub mod nats;

pub const SECRET: &str = "lox24-test-secret";
pub const SENDIOS_SECRET: &str = "sendios-test-secret";
pub const TENCENT_APP: &str = "1400000000";
pub const SEED_EXAMPLE_FILE: &str = "tests/fixtures/lox24-unsubscribe-en.txt";

/// The current Unix time in seconds.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The example JSON of a seed page, cut out verbatim.
pub fn seed_example(file: &str, starts: &str, ends_before: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let page = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let start = page.find(starts).expect("example start");
    let end = start + page[start..].find(ends_before).expect("example end");
    page[start..end].trim().to_owned()
}

/// The LOX24 English page's example payload, byte for byte.
pub fn lox24_seed() -> String {
    seed_example(SEED_EXAMPLE_FILE, "{\n\"id\"", "Webhook received")
}

/// A LOX24 unsubscribe for `phone` with event `id`, unsubscribed at `created_at` seconds.
pub fn lox24_event(id: &str, phone: &str, created_at: i64) -> String {
    serde_json::json!({
        "id": id,
        "name": "phone.unsubscribe",
        "created_at": created_at,
        "api_version": "2022-05-25",
        "attempt_number": 1,
        "attempt_total": 4,
        "data": {
            "phone": phone, "user_id": 7, "created_at": created_at, "campaign_code": "C1",
            "additional_data": {"reason": {"id": 2, "label": "Too many messages"}, "additional_text": "stop"},
            "short_link_code": "abc", "unsubscribe_request_id": 1,
        }
    })
    .to_string()
}

#[derive(Clone)]
pub struct Options {
    pub lox24: bool,
    pub tls_files: bool,
    pub api_tokens: Option<String>,
    pub api_listen: &'static str,
    /// Enables Tencent with SdkAppid [`TENCENT_APP`] and, if given, this token.
    pub tencent: Option<Option<&'static str>>,
    pub sendios: bool,
    pub extra: Vec<String>,
    /// Environment variables for the process (e.g. `NOTIFY_SOCKET`).
    pub env: Vec<(String, String)>,
    /// A command the binary runs under, e.g. `strace -f -o FILE`.
    pub prefix: Vec<String>,
    /// Another build of the binary (see [`release_binary`]); the test build by default.
    pub program: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            lox24: true,
            tls_files: true,
            api_tokens: None,
            api_listen: "127.0.0.1:0",
            tencent: None,
            sendios: false,
            extra: Vec::new(),
            env: Vec::new(),
            prefix: Vec::new(),
            program: None,
        }
    }
}

pub struct Server {
    child: Option<Child>,
    pub webhook: SocketAddr,
    pub api: SocketAddr,
    pub dir: Arc<tempfile::TempDir>,
    pub data_dir: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    prefix: Vec<String>,
    program: PathBuf,
    logs: Arc<Mutex<Vec<String>>>,
    tls: tokio_rustls::TlsConnector,
    pub api_token: Option<String>,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_suppressd")
}

/// The release build of the binary, built once per test process: what operators run, for the
/// tests whose timing depends on it.
pub fn release_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let manifest = env!("CARGO_MANIFEST_DIR");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--release", "--locked", "--bin", "suppressd"])
                .current_dir(manifest)
                .status()
                .unwrap();
            assert!(status.success(), "building the release binary failed");
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(manifest).join("target"));
            target.join("release/suppressd")
        })
        .clone()
}

/// A client TLS configuration that trusts only the certificates in `cert_pem`.
fn connector(cert_pem: &str) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in pem_certs(cert_pem) {
        roots.add(cert).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// The DER certificates in a PEM text.
pub fn pem_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(Result::unwrap)
        .collect()
}

impl Server {
    pub fn start(options: Options) -> Server {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        Server::start_in(dir, options)
    }

    pub fn start_in(dir: Arc<tempfile::TempDir>, options: Options) -> Server {
        let data_dir = dir.path().join("data");
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--webhook-listen".into(),
            "127.0.0.1:0".into(),
            "--api-listen".into(),
            options.api_listen.into(),
        ];
        let cert_path = dir.path().join("cert.pem");
        if options.tls_files {
            if !cert_path.exists() {
                let generated = rcgen::generate_simple_self_signed(vec![
                    "localhost".into(),
                    "127.0.0.1".into(),
                ])
                .unwrap();
                std::fs::write(&cert_path, generated.cert.pem()).unwrap();
                std::fs::write(
                    dir.path().join("key.pem"),
                    generated.key_pair.serialize_pem(),
                )
                .unwrap();
            }
            args.extend([
                "--tls-cert".into(),
                cert_path.display().to_string(),
                "--tls-key".into(),
                dir.path().join("key.pem").display().to_string(),
            ]);
        }
        if options.lox24 {
            let secret = dir.path().join("lox24.secret");
            std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
            std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            args.extend(["--lox24-secret-file".into(), secret.display().to_string()]);
        }
        if let Some(token) = options.tencent {
            args.extend(["--tencent-sdkappid".into(), TENCENT_APP.into()]);
            if let Some(token) = token {
                let file = dir.path().join("tencent.token");
                std::fs::write(&file, token).unwrap();
                args.extend(["--tencent-token-file".into(), file.display().to_string()]);
            }
        }
        if options.sendios {
            let file = dir.path().join("sendios.secret");
            std::fs::write(&file, SENDIOS_SECRET).unwrap();
            args.extend(["--sendios-secret-file".into(), file.display().to_string()]);
        }
        let mut api_token = None;
        if let Some(tokens) = &options.api_tokens {
            let file = dir.path().join("api.tokens");
            std::fs::write(&file, tokens).unwrap();
            args.extend(["--api-token-file".into(), file.display().to_string()]);
            api_token = tokens
                .lines()
                .next()
                .map(|l| l.split_once(':').map_or(l, |(_, t)| t).trim().to_owned());
        }
        args.extend(options.extra.iter().cloned());
        let mut server = Server {
            child: None,
            webhook: "127.0.0.1:1".parse().unwrap(),
            api: "127.0.0.1:1".parse().unwrap(),
            dir,
            data_dir,
            args,
            env: options.env.clone(),
            prefix: options.prefix.clone(),
            program: options
                .program
                .clone()
                .unwrap_or_else(|| PathBuf::from(binary())),
            logs: Arc::new(Mutex::new(Vec::new())),
            tls: connector(""),
            api_token,
        };
        server.launch();
        let cert = if options.tls_files {
            cert_path
        } else {
            server.data_dir.join("tls/cert.pem")
        };
        // With --insecure-http there is no certificate to trust.
        if let Ok(pem) = std::fs::read_to_string(cert) {
            server.tls = connector(&pem);
        }
        server
    }

    /// Starts the binary with the stored arguments and waits for its "ready" line.
    fn launch(&mut self) {
        if let Err((status, logs)) = self.try_launch() {
            panic!("server did not become ready ({status:?}); log:\n{logs}");
        }
    }

    /// Starts the same configuration again, or says how the start failed: the exit status
    /// (`None` if it neither got ready nor exited within 30 s) and the log.
    pub fn try_restart(&mut self) -> Result<(), (Option<ExitStatus>, String)> {
        assert!(self.child.is_none(), "stop the server first");
        self.try_launch()
    }

    fn try_launch(&mut self) -> Result<(), (Option<ExitStatus>, String)> {
        let mut command = match self.prefix.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(&self.program);
                // Its own process group, so that `kill` can reach the server behind the wrapper.
                std::os::unix::process::CommandExt::process_group(&mut command, 0);
                command
            }
            None => Command::new(&self.program),
        };
        let mut child = command
            .args(&self.args)
            .env("RUST_LOG", "info")
            // Small segments, so that the small file systems of the storage tests hold the log.
            .env("SUPPRESSD_LOG_SEGMENT_MB", "4")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let logs = self.logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("suppressd ready") {
                    let _ = ready_tx.send(line.clone());
                }
                logs.lock().unwrap().push(line);
            }
        });
        let Ok(ready) = ready_rx.recv_timeout(Duration::from_secs(30)) else {
            // Its log ending comes just before its exit can be collected.
            let deadline = Instant::now() + Duration::from_secs(5);
            let status = loop {
                match child.try_wait().unwrap() {
                    Some(status) => break Some(status),
                    None if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    None => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break None;
                    }
                }
            };
            return Err((status, self.logs.lock().unwrap().join("\n")));
        };
        self.webhook = field(&ready, "webhook=").parse().unwrap();
        self.api = field(&ready, "api=").parse().unwrap();
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL, as a crash or OOM kill would.
    #[allow(unsafe_code)]
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if self.prefix.is_empty() {
            child.kill().unwrap();
        } else {
            // A killed wrapper (strace) detaches from the server and leaves it running, so the
            // whole process group goes.
            let group = i32::try_from(child.id()).unwrap();
            // SAFETY: kill(2) on our own child's process group has no memory-safety preconditions.
            assert_eq!(unsafe { libc::kill(-group, libc::SIGKILL) }, 0);
        }
        child.wait().unwrap();
    }

    /// Sends a signal without waiting, e.g. SIGKILL while requests are in flight.
    #[allow(unsafe_code)]
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.pid()).unwrap();
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// Waits for a process that was signalled to exit.
    pub fn reap(&mut self) -> Option<ExitStatus> {
        self.child.take().map(|mut child| child.wait().unwrap())
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the same configuration again on the same data directory (new ports).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the server first");
        self.launch();
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// The logs once they contain `needle`: the server writes a line before it answers, but this
    /// process reads its stderr on another thread, so a line can arrive after the reply.
    pub async fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let logs = self.logs();
            if logs.contains(needle) {
                return logs;
            }
            assert!(
                Instant::now() < deadline,
                "log never said {needle:?}:\n{logs}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `POST` to the webhook listener over HTTPS.
    pub async fn webhook(
        &self,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        self.webhook_method("POST", path_and_query, headers, body)
            .await
    }

    pub async fn webhook_method(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        self.try_webhook(method, path_and_query, headers, body.into())
            .await
            .unwrap_or_else(|e| panic!("{method} {path_and_query}: {e}"))
    }

    /// From now on, webhook clients trust these certificates (PEM) instead.
    pub fn trust(&mut self, cert_pems: &str) {
        self.tls = connector(cert_pems);
    }

    /// Opens a TLS connection to the webhook listener.
    pub async fn webhook_tls(&self) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let tcp = TcpStream::connect(self.webhook)
            .await
            .map_err(|e| e.to_string())?;
        let name =
            rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        self.tls.connect(name, tcp).await.map_err(|e| e.to_string())
    }

    /// TLS over a TCP connection the test opened itself (e.g. from another source address).
    pub async fn tls_over(&self, tcp: TcpStream) -> tokio_rustls::client::TlsStream<TcpStream> {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        self.tls.connect(name, tcp).await.unwrap()
    }

    /// The leaf certificate a new handshake is served.
    pub async fn served_certificate(&self) -> Vec<u8> {
        let tls = self.webhook_tls().await.unwrap();
        let certs = tls.get_ref().1.peer_certificates().unwrap();
        certs[0].as_ref().to_vec()
    }

    /// Like `webhook_method`, but a connection failure is an `Err` instead of a panic.
    pub async fn try_webhook(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Reply, String> {
        let tls = self.webhook_tls().await?;
        send(tls, method, path_and_query, headers, body).await
    }

    /// A LOX24 delivery's status, or `None` if the connection failed.
    pub async fn try_lox24(&self, body: String) -> Option<u16> {
        let auth = format!("Bearer {SECRET}");
        self.try_webhook(
            "POST",
            "/webhooks/lox24",
            &[("authorization", &auth)],
            body.into(),
        )
        .await
        .ok()
        .map(|r| r.status)
    }

    /// A LOX24 delivery authenticated with the Bearer secret.
    pub async fn lox24(&self, body: impl Into<Bytes>) -> Reply {
        let auth = format!("Bearer {SECRET}");
        self.webhook("/webhooks/lox24", &[("authorization", &auth)], body)
            .await
    }

    /// A Sendios delivery authenticated with the Bearer secret.
    pub async fn sendios(&self, body: impl Into<Bytes>) -> Reply {
        let auth = format!("Bearer {SENDIOS_SECRET}");
        self.webhook("/webhooks/sendios", &[("authorization", &auth)], body)
            .await
    }

    /// A request to the local API, with the configured token if any.
    pub async fn api(&self, method: &str, path: &str, body: impl Into<Bytes>) -> Reply {
        let auth = self.api_token.as_ref().map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        self.api_with(method, path, &headers, body).await
    }

    pub async fn api_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let tcp = TcpStream::connect(self.api).await.unwrap();
        send(tcp, method, path, headers, body.into())
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.api("GET", path, Bytes::new()).await
    }

    /// `POST /v1/import` of a plain list, one number a line.
    pub async fn import_list(&self, numbers: &[impl AsRef<str>]) -> Reply {
        let body: Vec<&str> = numbers.iter().map(AsRef::as_ref).collect();
        self.api_with(
            "POST",
            "/v1/import",
            &[("content-type", "text/plain")],
            body.join("\n"),
        )
        .await
    }

    /// Reads a counter or gauge from `/metrics` (sum over matching label sets).
    pub async fn metric(&self, name_and_labels: &str) -> f64 {
        let text = self.get("/metrics").await.text;
        text.lines()
            .filter(|l| l.starts_with(name_and_labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let start = line.find(key).unwrap() + key.len();
    line[start..].split_whitespace().next().unwrap()
}

pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
}

/// One HTTP/1.1 request on `stream`, with the body collected.
pub async fn send<S>(
    stream: S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Reply, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(body)).map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Reply {
        status,
        headers,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

/// Fails the test unless every tool is on PATH: a test that cannot run must not show as a pass.
/// `.ci/run`, the README's test command, installs them.
pub fn require_tools(test: &str, tools: &[&str]) {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .unwrap()
                .status
                .success()
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{test}: missing {missing:?}; run the suite with .ci/run, which installs them"
    );
}

/// Runs the binary to completion (for startup failures) and returns its status and stderr; a
/// binary that is still running after 30 s is killed and the test fails.
pub fn run_to_exit(args: &[&str]) -> (ExitStatus, String) {
    let mut child = Command::new(binary())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("suppressd {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status, stderr)
}

/// Unmounts the scratch tmpfs when the test ends, after the server using it is gone.
pub struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// A small tmpfs, or `None` where this user may not mount (the test then says so).
    pub fn mount(path: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then(|| Tmpfs(path.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// An ext4 file system in an image file, loop-mounted with `errors=remount-ro`: the kernel's
/// own way of turning a data directory read-only under a running service.
pub struct LoopExt4 {
    image: PathBuf,
    mount_point: PathBuf,
    devices: Mutex<Vec<String>>,
}

impl LoopExt4 {
    /// A fresh file system of `megabytes` mounted at `mount_point`, or `None` where this user
    /// may not mount (not root: the test then says so). As root, failing to mount fails the test.
    #[allow(unsafe_code)]
    pub fn mount(image: &Path, mount_point: &Path, megabytes: u64) -> Option<LoopExt4> {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        std::fs::File::create(image)
            .unwrap()
            .set_len(megabytes << 20)
            .unwrap();
        let made = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(image)
            .status()
            .unwrap();
        assert!(made.success(), "mkfs.ext4 failed");
        std::fs::create_dir_all(mount_point).unwrap();
        let fs = LoopExt4 {
            image: image.to_owned(),
            mount_point: mount_point.to_owned(),
            devices: Mutex::new(Vec::new()),
        };
        fs.attach();
        Some(fs)
    }

    /// Mounts the image through a loop device of its own: `mount -o loop` would reuse the one
    /// still attached, and with it the kernel's read-only instance of the file system. Tests
    /// running at once can race for the same free device, so taking one is retried.
    fn attach(&self) {
        let mut attempts = 0;
        let device = loop {
            let losetup = Command::new("losetup")
                .args(["--find", "--show"])
                .arg(&self.image)
                .output()
                .unwrap();
            if losetup.status.success() {
                break String::from_utf8(losetup.stdout).unwrap().trim().to_owned();
            }
            attempts += 1;
            assert!(
                attempts < 10,
                "losetup failed: {}",
                String::from_utf8_lossy(&losetup.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        self.devices.lock().unwrap().push(device.clone());
        let mounted = Command::new("mount")
            .args(["-o", "errors=remount-ro", &device])
            .arg(&self.mount_point)
            .output()
            .unwrap();
        assert!(
            mounted.status.success(),
            "mounting {device} failed: {}",
            String::from_utf8_lossy(&mounted.stderr)
        );
    }

    /// Makes ext4 report an error, as it does on an I/O failure: it turns the file system
    /// read-only at once, open files included.
    pub fn fail(&self) {
        let devices = self.devices.lock().unwrap();
        let device = devices.last().unwrap().trim_start_matches("/dev/");
        std::fs::write(
            format!("/sys/fs/ext4/{device}/trigger_fs_error"),
            "suppressd test",
        )
        .unwrap();
    }

    /// What an operator does once the cause is fixed: the file system is checked and mounted
    /// again. Files the service still holds keep the read-only instance alive until it lets go.
    pub fn repair(&self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mount_point)
            .status();
        let checked = Command::new("e2fsck")
            .args(["-f", "-y"])
            .arg(&self.image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        // 0: clean, 1: errors corrected.
        assert!(matches!(checked.code(), Some(0 | 1)), "e2fsck: {checked:?}");
        self.attach();
    }
}

impl Drop for LoopExt4 {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mount_point)
            .status();
        // A device still in use is detached once its last user lets go.
        for device in self.devices.lock().unwrap().iter() {
            let _ = Command::new("losetup").args(["-d", device]).status();
        }
    }
}

/// Notifications received, each with the time it arrived, and a signal for each new one.
type Inbox = Arc<(Mutex<VecDeque<(Instant, String)>>, Condvar)>;

/// A datagram socket standing in for systemd's notification socket.
pub struct NotifySocket {
    received: Inbox,
    stop: Arc<AtomicBool>,
    _dir: tempfile::TempDir,
    pub path: String,
}

impl NotifySocket {
    /// Binds the socket and, like systemd, reads it all the time: a manager that stops
    /// reading makes the service's notifications block once the socket's queue is full.
    pub fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let received: Inbox = Arc::new((Mutex::new(VecDeque::new()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (inbox, stopped) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                    inbox.0.lock().unwrap().push_back((Instant::now(), message));
                    inbox.1.notify_all();
                }
            }
        });
        NotifySocket {
            received,
            stop,
            path: path.display().to_string(),
            _dir: dir,
        }
    }

    /// Forgets the messages received so far.
    pub fn clear(&self) {
        self.received.0.lock().unwrap().clear();
    }

    /// Takes every message received so far, with the time each arrived.
    pub fn take_all(&self) -> Vec<(Instant, String)> {
        self.received.0.lock().unwrap().drain(..).collect()
    }

    /// Takes messages until one contains `line`; returns everything taken up to it. Fails after
    /// 10 s without one.
    pub fn wait_for(&self, line: &str) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        let mut messages = self.received.0.lock().unwrap();
        loop {
            while let Some((_, message)) = messages.pop_front() {
                let found = message.lines().any(|l| l == line);
                seen.push(message);
                if found {
                    return seen;
                }
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("no {line} within 10 s (saw {seen:?})"));
            messages = self.received.1.wait_timeout(messages, left).unwrap().0;
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
