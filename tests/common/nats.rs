//! A JetStream cluster of real `nats-server` processes on loopback ports, each with its own
//! store in a temp dir, for the cluster tests.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NatsCluster {
    dir: tempfile::TempDir,
    servers: Vec<NatsServer>,
}

struct NatsServer {
    config: PathBuf,
    client_port: u16,
    child: Option<Child>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl NatsCluster {
    /// Starts `count` servers that form one JetStream cluster, and waits until each listens.
    pub fn start(count: usize) -> NatsCluster {
        super::require_tools("the cluster tests", &["nats-server"]);
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..count).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, route)| format!("\"nats-route://127.0.0.1:{route}\""))
            .collect();
        let mut servers = Vec::new();
        for (i, (client_port, route_port)) in ports.iter().enumerate() {
            let config = dir.path().join(format!("n{i}.conf"));
            let store = dir.path().join(format!("js{i}"));
            std::fs::write(
                &config,
                format!(
                    "server_name: \"n{i}\"\nlisten: \"127.0.0.1:{client_port}\"\n\
                     jetstream {{ store_dir: \"{}\" }}\n\
                     cluster {{\n  name: \"suppressd-test\"\n  listen: \"127.0.0.1:{route_port}\"\n  routes: [{}]\n}}\n",
                    store.display(),
                    routes.join(", ")
                ),
            )
            .unwrap();
            servers.push(NatsServer {
                config,
                client_port: *client_port,
                child: None,
            });
        }
        let mut cluster = NatsCluster { dir, servers };
        for i in 0..count {
            cluster.start_server(i);
        }
        for i in 0..count {
            cluster.wait_listening(i);
        }
        cluster
    }

    /// `--cluster-nats` for the nodes: every server.
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn start_server(&mut self, i: usize) {
        let log = self.dir.path().join(format!("n{i}.log"));
        let server = &mut self.servers[i];
        assert!(server.child.is_none(), "server {i} runs already");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        server.child = Some(
            Command::new("nats-server")
                .arg("-c")
                .arg(&server.config)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    pub fn wait_listening(&self, i: usize) {
        let port = self.servers[i].client_port;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server {i} does not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, as a crashed machine under the stream would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i].child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub fn kill_all(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
    }

    pub fn start_all(&mut self) {
        for i in 0..self.servers.len() {
            self.start_server(i);
        }
        for i in 0..self.servers.len() {
            self.wait_listening(i);
        }
    }

    /// The servers' logs, for a failing test's message.
    pub fn logs(&self) -> String {
        (0..self.servers.len())
            .map(|i| {
                std::fs::read_to_string(self.dir.path().join(format!("n{i}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}
