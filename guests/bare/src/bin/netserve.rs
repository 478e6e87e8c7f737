//! `netserve`: a TCP echo server (RFC 862) on its virtio-net device, with smoltcp as the
//! TCP/IP stack, entirely at CPL3 and polling (no interrupts).
//!
//! Command line: `ip=A.B.C.D/P` (default 10.0.2.15/24), `port=N` (default 7), `conns=N`
//! (exit 0 after N connections ended; default 0 = serve forever).
//!
//! At start it sends a gratuitous ARP for its address. Console: `netserve: listening on
//! IP:PORT mac M` once ready, then per connection
//! `netserve: connection K ended after B bytes echoed`.
//!
//! Every byte received is echoed back in order. When the client half-closes, the server
//! closes once everything is echoed, so `socat -t 60 - TCP:IP:7 < file > copy` ends with
//! `copy` equal to `file`. Four connections at a time.
#![no_std]
#![no_main]

use core::marker::PhantomData;
use rt::virtio_net::Net;
use rt::{cmdline, io, println, time};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet, SocketStorage};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, IpCidr, Ipv4Address};

const SOCKETS: usize = 4;
const SOCK_BUF: usize = 64 * 1024;

struct Dev(Net);

struct RxTok<'a> {
    net: *mut Net,
    id: u16,
    len: usize,
    _p: PhantomData<&'a mut Net>,
}

struct TxTok<'a> {
    net: *mut Net,
    _p: PhantomData<&'a mut Net>,
}

impl phy::RxToken for RxTok<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        // SAFETY: the tokens of one `receive` are consumed one after the other on this one
        // CPU; the receive buffer and the transmit buffers are disjoint parts of `Net`.
        let net = unsafe { &mut *self.net };
        let r = f(net.rx_frame(self.id, self.len));
        net.rx_done(self.id);
        r
    }
}

static mut SCRATCH: [u8; 2048] = [0; 2048];

impl phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        // SAFETY: as for `RxTok`.
        let net = unsafe { &mut *self.net };
        let mut f = Some(f);
        match net.send(len, |b| (f.take().unwrap())(b)) {
            Some(r) => r,
            // Every transmit buffer is in flight: the frame is dropped (TCP resends).
            None => {
                // SAFETY: the only user of SCRATCH, on this CPU.
                let scratch = unsafe { &mut *(&raw mut SCRATCH) };
                (f.take().unwrap())(&mut scratch[..len.min(2048)])
            }
        }
    }
}

impl Device for Dev {
    type RxToken<'a> = RxTok<'a>;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _t: Instant) -> Option<(RxTok<'_>, TxTok<'_>)> {
        let (id, len) = self.0.rx_poll()?;
        let net: *mut Net = &mut self.0;
        Some((
            RxTok { net, id, len, _p: PhantomData },
            TxTok { net, _p: PhantomData },
        ))
    }

    fn transmit(&mut self, _t: Instant) -> Option<TxTok<'_>> {
        if !self.0.can_send() {
            return None;
        }
        Some(TxTok { net: &mut self.0, _p: PhantomData })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c.max_burst_size = Some(32);
        c
    }
}

fn now() -> Instant {
    Instant::from_micros((time::ticks_to_ns(time::rdtsc()) / 1000) as i64)
}

/// `A.B.C.D/P` → (address, prefix).
fn parse_cidr(s: &str) -> Option<(Ipv4Address, u8)> {
    let (a, p) = s.split_once('/').unwrap_or((s, "24"));
    let mut o = [0u8; 4];
    let mut parts = a.split('.');
    for b in o.iter_mut() {
        *b = parts.next()?.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    let p: u8 = p.parse().ok().filter(|p| *p <= 32)?;
    Some((Ipv4Address::new(o[0], o[1], o[2], o[3]), p))
}

static mut STORAGE: [SocketStorage<'static>; SOCKETS] = [SocketStorage::EMPTY; SOCKETS];
static mut BUFS: [[[u8; SOCK_BUF]; 2]; SOCKETS] = [[[0; SOCK_BUF]; 2]; SOCKETS];
static mut TMP: [u8; 16 * 1024] = [0; 16 * 1024];

#[no_mangle]
extern "C" fn guest_main(cpu: usize, _si: u64) -> ! {
    if cpu != 0 {
        loop {
            core::hint::spin_loop();
        }
    }
    let Some((ip, prefix)) = parse_cidr(cmdline::get("ip").unwrap_or("10.0.2.15/24")) else {
        println!("netserve: bad ip= (want A.B.C.D/P)");
        io::exit(2)
    };
    let port = cmdline::get_u64("port", 7) as u16;
    let conns = cmdline::get_u64("conns", 0);
    let net = match Net::open() {
        Ok(n) => n,
        Err(e) => {
            println!("netserve: no network device: {e:?}");
            io::exit(2)
        }
    };
    let mac = net.mac;
    let mut dev = Dev(net);
    // A gratuitous ARP, as an OS sends when its interface comes up: switches learn where the
    // MAC is (it may have been elsewhere before) and neighbours refresh their caches.
    let o = ip.octets();
    dev.0.send(42, |f| {
        f[..6].fill(0xff);
        f[6..12].copy_from_slice(&mac);
        f[12..14].copy_from_slice(&[0x08, 0x06]);
        f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f[22..28].copy_from_slice(&mac);
        f[28..32].copy_from_slice(&o);
        f[32..38].fill(0);
        f[38..42].copy_from_slice(&o);
    });
    dev.0.flush();
    let mut cfg = Config::new(EthernetAddress(mac).into());
    cfg.random_seed = time::rdtsc();
    let mut iface = Interface::new(cfg, &mut dev, now());
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(ip.into(), prefix));
    });
    // SAFETY: the only users of these statics, on CPU 0, for the whole run.
    let (storage, bufs, tmp) = unsafe {
        (
            &mut *(&raw mut STORAGE),
            &mut *(&raw mut BUFS),
            &mut *(&raw mut TMP),
        )
    };
    let mut sockets = SocketSet::new(&mut storage[..]);
    let mut handles: [Option<(SocketHandle, u64, bool)>; SOCKETS] = [None; SOCKETS];
    for (h, [rx, tx]) in handles.iter_mut().zip(bufs.iter_mut()) {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(&mut rx[..]),
            tcp::SocketBuffer::new(&mut tx[..]),
        );
        s.set_nagle_enabled(false);
        s.set_ack_delay(None);
        let _ = s.listen(port);
        *h = Some((sockets.add(s), 0, false));
    }
    println!(
        "netserve: listening on {ip}:{port} mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    );
    let mut ended = 0u64;
    loop {
        iface.poll(now(), &mut dev, &mut sockets);
        for slot in handles.iter_mut().flatten() {
            let (h, echoed, active) = slot;
            let s = sockets.get_mut::<tcp::Socket>(*h);
            if s.is_active() {
                *active = true;
            }
            while s.can_recv() && s.send_queue() < s.send_capacity() {
                let room = (s.send_capacity() - s.send_queue()).min(tmp.len());
                let n = s.recv_slice(&mut tmp[..room]).unwrap_or(0);
                if n == 0 {
                    break;
                }
                let _ = s.send_slice(&tmp[..n]);
                *echoed += n as u64;
            }
            if s.state() == tcp::State::CloseWait && s.send_queue() == 0 {
                s.close();
            }
            if *active && !s.is_open() {
                ended += 1;
                println!("netserve: connection {ended} ended after {echoed} bytes echoed");
                *echoed = 0;
                *active = false;
                let _ = s.listen(port);
                if conns > 0 && ended >= conns {
                    io::exit(0)
                }
            }
        }
        iface.poll(now(), &mut dev, &mut sockets);
        dev.0.flush();
    }
}
