//! A TCP relay a test can cut and restore, to make a peer (S3) unreachable
//! and bring it back on the same address. Cutting closes the listener (new
//! connections are refused, as by a host that is down) and every relayed
//! connection; restoring listens again on the same port.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

pub struct Relay {
    addr: SocketAddr,
    target: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl Relay {
    /// Relays a loopback port to `target_port` on loopback.
    pub async fn start(target_port: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = SocketAddr::from(([127, 0, 0, 1], target_port));
        Relay {
            addr,
            target,
            task: Some(tokio::spawn(serve(listener, target))),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Refuses new connections and closes the relayed ones.
    pub fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            // Dropping the task drops the listener and the connections'
            // JoinSet, which aborts them.
            task.abort();
        }
    }

    /// Listens on the same port again (bounded wait for the port).
    pub async fn restore(&mut self) {
        assert!(self.task.is_none(), "the relay is not cut");
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot listen on {} again: {e}", self.addr),
            }
        };
        self.task = Some(tokio::spawn(serve(listener, self.target)));
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
    }
}

async fn serve(listener: TcpListener, target: SocketAddr) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((mut inbound, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        connections.spawn(async move {
            if let Ok(mut outbound) = TcpStream::connect(target).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}
