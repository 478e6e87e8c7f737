//! A delay line: two network namespaces joined by a wire that adds a fixed one-way delay,
//! for a link with a real round-trip time where the kernel has no `sch_netem` (nor `fq`, so
//! no EDT-based delay either).
//!
//! Each namespace gets a tap (`dl0`); this process holds both taps and, per direction, a
//! thread that reads frames from one tap and writes each to the other once `delay` has passed
//! since it was read (`ppoll` with a nanosecond timeout and 1 ns timer slack). Every protocol
//! sees the same wire: iperf3's TCP and the FT link's QUIC alike. The wire's own ceiling (one
//! read and one write system call per frame, no offloads) is below 10 Gbit/s, so results on it
//! are compared with iperf3 on the same wire, never with the veth path.
use crate::link::in_netns;
use crate::sh;
use anyhow::Result;
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const ADDR_A: &str = "10.232.1.1";
pub const ADDR_B: &str = "10.232.1.2";
const MTU: &str = "9000";

pub struct DelayLine {
    pub a: String,
    pub b: String,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Opens tap `dl0` inside namespace `ns` (a tap belongs to the namespace it is created in).
fn tap_in(ns: &str) -> Result<File> {
    in_netns(Some(ns.to_string()), || Ok(vmm::devices::tap::open("dl0")?))
}

impl DelayLine {
    pub fn create(one_way: Duration) -> Result<Self> {
        let id = std::process::id();
        let (a, b) = (format!("ftvm-dl-a-{id}"), format!("ftvm-dl-b-{id}"));
        for ns in [&a, &b] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .output();
            sh(&["ip", "netns", "add", ns])?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut line = DelayLine {
            a: a.clone(),
            b: b.clone(),
            stop: stop.clone(),
            threads: vec![],
        };
        let (ta, tb) = (tap_in(&a)?, tap_in(&b)?);
        for (ns, addr) in [(&a, ADDR_A), (&b, ADDR_B)] {
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            sh(&["ip", "-n", ns, "link", "set", "dl0", "mtu", MTU])?;
            // Room for bursts while the relay thread is scheduled out (the default 1000
            // frames drop a QUIC burst of 1452-byte datagrams).
            sh(&["ip", "-n", ns, "link", "set", "dl0", "txqueuelen", "20000"])?;
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "dl0",
            ])?;
            sh(&["ip", "-n", ns, "link", "set", "dl0", "up"])?;
        }
        let (ta, tb) = (Arc::new(ta), Arc::new(tb));
        for (from, to) in [(ta.clone(), tb.clone()), (tb, ta)] {
            let stop = stop.clone();
            line.threads.push(
                std::thread::Builder::new()
                    .name("delay-line".into())
                    .spawn(move || relay(&from, &to, one_way, &stop))?,
            );
        }
        Ok(line)
    }

    /// Round-trip times of 64-byte UDP messages across the line, echoed by a socket in
    /// namespace `a` to one in `b`: "min / median / max µs" of 50.
    pub fn rtt(&self) -> Result<String> {
        let (a, b) = (self.a.clone(), self.b.clone());
        let echo = in_netns(Some(a), || {
            Ok(std::net::UdpSocket::bind(format!("{ADDR_A}:0"))?)
        })?;
        let to = echo.local_addr()?;
        echo.set_read_timeout(Some(Duration::from_secs(2)))?;
        let server = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            for _ in 0..50 {
                let Ok((n, from)) = echo.recv_from(&mut buf) else {
                    return;
                };
                let _ = echo.send_to(&buf[..n], from);
            }
        });
        let mut rtts = in_netns(Some(b), move || {
            let s = std::net::UdpSocket::bind(format!("{ADDR_B}:0"))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut buf = [0u8; 64];
            let mut v = Vec::new();
            for _ in 0..50 {
                let t = Instant::now();
                s.send_to(&[7u8; 64], to)?;
                s.recv_from(&mut buf)?;
                v.push(t.elapsed().as_secs_f64() * 1e6);
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(v)
        })?;
        let _ = server.join();
        rtts.sort_by(f64::total_cmp);
        Ok(format!(
            "{:.0} / {:.0} / {:.0} µs",
            rtts[0],
            rtts[rtts.len() / 2],
            rtts[rtts.len() - 1]
        ))
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for ns in [&self.a, &self.b] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .output();
        }
    }
}

/// Moves frames from `from` to `to`, each `delay` after it arrived, until `stop`.
fn relay(from: &File, to: &File, delay: Duration, stop: &AtomicBool) {
    // SAFETY: prctl with an integer argument only changes this thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64) };
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while queue.front().is_some_and(|(due, _)| *due <= now) {
            let (_, f) = queue.pop_front().unwrap();
            vmm::devices::tap::write_frame(to, &f);
        }
        let wait = queue
            .front()
            .map_or(Duration::from_millis(100), |(due, _)| {
                due.saturating_duration_since(now)
            });
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        let mut pfd = libc::pollfd {
            fd: from.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, a valid timespec, no signal mask change.
        unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        while let Some(n) = vmm::devices::tap::read_frame(from, &mut buf).filter(|n| *n > 0) {
            queue.push_back((Instant::now() + delay, buf[..n].to_vec()));
        }
    }
}
