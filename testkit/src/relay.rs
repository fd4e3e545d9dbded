//! A TCP relay in front of a server that a test cuts, to drop a client's network
//! mid-stream: every open connection is dropped, and new ones are refused, until it is let
//! through again. Loopback only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// The relay; it runs until the test's runtime ends.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    generation: Arc<AtomicU32>,
}

impl Relay {
    /// Relays connections on a loopback port of its own to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(AtomicU32::new(0));
        let (is_open, current) = (open.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !is_open.load(Ordering::SeqCst) {
                    continue;
                }
                let born = current.load(Ordering::SeqCst);
                let current = current.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
                    let cut = async {
                        while current.load(Ordering::SeqCst) == born {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    };
                    tokio::select! {
                        _ = copy => {}
                        () = cut => {}
                    }
                });
            }
        });
        Self {
            addr,
            open,
            generation,
        }
    }

    /// `http://` and its address, as a client's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Lets connections through again.
    pub fn heal(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}
