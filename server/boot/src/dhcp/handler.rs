//! The packet logic, free of sockets: bytes in, at most one reply (bytes and destination) out.
//! Every decision about a packet is made here, so unit tests and the fuzz test drive it directly.

use super::config::{DhcpConfig, Mode, UnknownPolicy};
use super::pxe::{Client, Firmware};
use anyhow::{Context, Result};
use dhcproto::v4::{self, DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use si_inventory::{self, format_mac, Inventory, Lease, LeaseBook, Node, Subnet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use tracing::{debug, info, warn};

/// Smallest BOOTP message (RFC 951 without vendor area) plus the DHCP magic cookie.
const MIN_LEN: usize = 240;
/// Largest datagram we accept or build (Ethernet MTU); larger packets are dropped.
pub const MAX_LEN: usize = 1500;
/// Lease time sent for permanent leases (RFC 2131: 0xffffffff is infinity).
const INFINITE: u32 = u32::MAX;
/// Pools larger than this are scanned only this far when looking for a free address.
const MAX_SCAN: u32 = 65_536;

/// Which socket a packet came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// 67: DHCP.
    Dhcp,
    /// 4011: PXE boot server (ProxyDHCP requests).
    Pxe,
}

/// A reply to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub bytes: Vec<u8>,
    pub dest: SocketAddrV4,
    /// For logs and tests.
    pub msg: Message,
}

/// At most this many offers are held at once (a flood of made-up MACs cannot grow it past).
const MAX_OFFERS: usize = 65_536;

/// Addresses offered and not yet requested: held in memory for `offer_hold` seconds, never
/// written to the inventory (an offer is not a binding, RFC 2131 4.3.1), so a DISCOVER costs
/// no write and its OFFER goes out before the burst's commit.
#[derive(Default)]
struct Offers {
    by_mac: std::collections::HashMap<String, (Ipv4Addr, i64)>,
    by_ip: std::collections::HashMap<Ipv4Addr, String>,
}

impl Offers {
    fn get(&self, mac: &str, now: i64) -> Option<Ipv4Addr> {
        self.by_mac
            .get(mac)
            .filter(|(_, exp)| *exp > now)
            .map(|(ip, _)| *ip)
    }

    /// Whether someone other than `mac` holds an unexpired offer of `ip`.
    fn held_by_other(&self, ip: Ipv4Addr, mac: &str, now: i64) -> bool {
        self.by_ip
            .get(&ip)
            .is_some_and(|m| m != mac && self.by_mac.get(m).is_some_and(|(_, e)| *e > now))
    }

    fn remove(&mut self, mac: &str) {
        if let Some((ip, _)) = self.by_mac.remove(mac) {
            if self.by_ip.get(&ip).is_some_and(|m| m == mac) {
                self.by_ip.remove(&ip);
            }
        }
    }

    /// Holds `ip` for `mac` until `expires`; false when the table is full of live offers.
    fn insert(&mut self, mac: &str, ip: Ipv4Addr, expires: i64, now: i64) -> bool {
        self.remove(mac);
        if self.by_mac.len() >= MAX_OFFERS {
            self.by_mac.retain(|_, (_, e)| *e > now);
            let live = &self.by_mac;
            self.by_ip.retain(|_, m| live.contains_key(m));
            if self.by_mac.len() >= MAX_OFFERS {
                return false;
            }
        }
        self.by_mac.insert(mac.to_string(), (ip, expires));
        self.by_ip.insert(ip, mac.to_string());
        true
    }
}

/// DHCPDECLINE bounds: over any [`DECLINE_WINDOW`] seconds, at most [`DECLINES_PER_CLIENT`]
/// from one MAC and [`DECLINES_TOTAL`] in all quarantine an address, for at most
/// [`QUARANTINE_MAX`] seconds (or the lease time when shorter). Past a bound, a DECLINE is
/// logged and ignored: forged DECLINEs can take a few addresses for a while, never a pool.
pub const DECLINE_WINDOW: i64 = 600;
pub const DECLINES_PER_CLIENT: usize = 2;
pub const DECLINES_TOTAL: usize = 16;
pub const QUARANTINE_MAX: i64 = 600;
/// Clients whose recent DECLINEs are remembered at once.
const MAX_DECLINERS: usize = 4096;

/// Recent DECLINEs that quarantined an address, by client and in all.
#[derive(Default)]
struct Declines {
    by_mac: std::collections::HashMap<String, Vec<i64>>,
    all: std::collections::VecDeque<i64>,
}

impl Declines {
    /// Counts a DECLINE from `mac` at `now` if both bounds allow it.
    fn allow(&mut self, mac: &str, now: i64) -> Result<(), &'static str> {
        let since = now - DECLINE_WINDOW;
        while self.all.front().is_some_and(|t| *t <= since) {
            self.all.pop_front();
        }
        if self.all.len() >= DECLINES_TOTAL {
            return Err("too many DECLINEs from all clients");
        }
        if !self.by_mac.contains_key(mac) && self.by_mac.len() >= MAX_DECLINERS {
            self.by_mac.retain(|_, v| v.iter().any(|t| *t > since));
            if self.by_mac.len() >= MAX_DECLINERS {
                return Err("too many declining clients");
            }
        }
        let v = self.by_mac.entry(mac.to_string()).or_default();
        v.retain(|t| *t > since);
        if v.len() >= DECLINES_PER_CLIENT {
            return Err("too many DECLINEs from this client");
        }
        v.push(now);
        self.all.push_back(now);
        Ok(())
    }
}

pub struct Handler {
    cfg: DhcpConfig,
    declines: std::sync::Mutex<Declines>,
    /// A connection of the handler's own to the same inventory, for its reads: a burst's
    /// reads share one read transaction on it.
    reader: Inventory,
    server_ip: Ipv4Addr,
    http_base: String,
    next_server: Ipv4Addr,
    /// Where the next pool scan starts (round robin over the pool).
    cursor: AtomicU32,
    offers: std::sync::Mutex<Offers>,
    /// The leases (mode `full` only; a ProxyDHCP server gives none).
    leases: Option<Arc<LeaseBook>>,
}

/// The address decision for a client.
struct Grant {
    ip: Ipv4Addr,
    /// `None`: permanent.
    lease: Option<u32>,
}

impl Handler {
    /// A handler answering as `server_ip`. In mode `full` it takes the inventory's
    /// [`LeaseBook`], which fails if another process keeps its leases.
    pub fn new(cfg: DhcpConfig, inv: Arc<Inventory>, server_ip: Ipv4Addr) -> Result<Handler> {
        let http_base = cfg
            .http_base
            .clone()
            .unwrap_or_else(|| format!("http://{server_ip}"))
            .trim_end_matches('/')
            .to_string();
        let next_server = cfg.next_server.unwrap_or(server_ip);
        let leases = match cfg.mode {
            Mode::Full => Some(inv.lease_book()?),
            Mode::Proxy => None,
        };
        let reader = Inventory::open(inv.path())?;
        Ok(Handler {
            cfg,
            reader,
            server_ip,
            http_base,
            next_server,
            cursor: AtomicU32::new(0),
            offers: Default::default(),
            declines: Default::default(),
            leases,
        })
    }

    /// The lease book (a ProxyDHCP handler never gets this far: it gives no addresses).
    fn leases(&self) -> Result<&LeaseBook> {
        self.leases
            .as_deref()
            .context("no leases in ProxyDHCP mode")
    }

    pub fn server_ip(&self) -> Ipv4Addr {
        self.server_ip
    }

    /// Handles one datagram. Malformed packets and internal errors are logged and dropped.
    pub fn handle(&self, buf: &[u8], src: SocketAddrV4, port: Port) -> Option<Reply> {
        let mut out = None;
        self.handle_many(&[(buf, src, port)], |r, _| out = Some(r));
        out
    }

    /// Handles a burst of packets: replies that promise nothing durable (offers, NAKs, boot
    /// information) go to `send` at once; ACKs once the leases they grant are durable, with
    /// one append to the lease journal for the whole burst (RFC 2131 4.3.2), and not at all
    /// if that fails (the client asks again).
    pub fn handle_many(
        &self,
        pkts: &[(&[u8], SocketAddrV4, Port)],
        mut send: impl FnMut(Reply, Port),
    ) {
        let mut acks = Vec::new();
        self.reader.reading(|| {
            for (b, s, p) in pkts {
                if let Some(r) = self.handle_one(b, *s, *p) {
                    if r.msg.opts().msg_type() == Some(MessageType::Ack) && *p == Port::Dhcp {
                        acks.push((r, *p));
                    } else {
                        send(r, *p);
                    }
                }
            }
        });
        let Some(book) = &self.leases else {
            acks.into_iter().for_each(|(r, p)| send(r, p));
            return;
        };
        match book.commit() {
            Ok(()) => acks.into_iter().for_each(|(r, p)| send(r, p)),
            Err(e) => warn!(
                error = format!("{e:#}"),
                dropped = acks.len(),
                "leases not recorded: ACKs not sent"
            ),
        }
    }

    fn handle_one(&self, buf: &[u8], src: SocketAddrV4, port: Port) -> Option<Reply> {
        if buf.len() < MIN_LEN || buf.len() > MAX_LEN {
            debug!(%src, len = buf.len(), "dropping datagram of impossible size");
            return None;
        }
        // dhcproto asserts on some malformed options (e.g. option 94 with a length other than
        // 3, classless routes with a prefix over 32): it only ever sees a rebuilt packet that
        // carries the options we use, each with a valid length.
        let Some((clean, relay_info)) = sanitize(buf) else {
            debug!(%src, "dropping packet with malformed options");
            return None;
        };
        let msg = match Message::decode(&mut Decoder::new(&clean)) {
            Ok(m) => m,
            Err(e) => {
                debug!(%src, error = %e, "dropping malformed DHCP packet");
                return None;
            }
        };
        if msg.opcode() != Opcode::BootRequest {
            return None;
        }
        // Only Ethernet; checked before chaddr() which would panic on hlen > 16.
        if msg.htype() != v4::HType::Eth || msg.hlen() != 6 {
            debug!(%src, "dropping non-Ethernet request");
            return None;
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&buf[28..34]);
        let mac = format_mac(&mac);
        let Some(mtype) = msg.opts().msg_type() else {
            debug!(%src, %mac, "dropping BOOTP request (no DHCP message type)");
            return None;
        };
        match self.dispatch(&msg, &mac, mtype, src, port) {
            Ok(Some(mut r)) => {
                // RFC 3046 2.2: echo the relay agent information option to the relay.
                if let Some(info) = relay_info.filter(|_| !msg.giaddr().is_unspecified()) {
                    r.msg
                        .opts_mut()
                        .insert(DhcpOption::Unknown(v4::UnknownOption::new(
                            OptionCode::RelayAgentInformation,
                            info,
                        )));
                }
                let mut bytes = Vec::with_capacity(576);
                if let Err(e) = r.msg.encode(&mut Encoder::new(&mut bytes)) {
                    warn!(%mac, error = %e, "cannot encode reply");
                    return None;
                }
                let bytes = fixed_option_order(&bytes).unwrap_or(bytes);
                if bytes.len() > MAX_LEN {
                    warn!(%mac, len = bytes.len(), "reply too large, dropped");
                    return None;
                }
                Some(Reply {
                    bytes,
                    dest: r.dest,
                    msg: r.msg,
                })
            }
            Ok(None) => None,
            Err(e) => {
                warn!(%mac, ?mtype, error = format!("{e:#}"), "request failed");
                None
            }
        }
    }

    fn dispatch(
        &self,
        msg: &Message,
        mac: &str,
        mtype: MessageType,
        src: SocketAddrV4,
        port: Port,
    ) -> Result<Option<Reply>> {
        let client = Client::from_message(msg);
        let node = self.reader.node_by_mac(mac)?;
        if port == Port::Pxe {
            // PXE boot server request (after a ProxyDHCP offer): answer with boot info only.
            if mtype != MessageType::Request && mtype != MessageType::Inform {
                return Ok(None);
            }
            return Ok(self
                .proxy_reply(msg, mac, node.as_ref(), &client, MessageType::Ack)
                .map(|m| Reply {
                    bytes: Vec::new(),
                    dest: if src.ip().is_unspecified() {
                        SocketAddrV4::new(Ipv4Addr::BROADCAST, self.cfg.client_port)
                    } else {
                        src
                    },
                    msg: m,
                }));
        }
        if self.cfg.mode == Mode::Proxy {
            if mtype != MessageType::Discover {
                return Ok(None);
            }
            return Ok(self
                .proxy_reply(msg, mac, node.as_ref(), &client, MessageType::Offer)
                .map(|m| Reply {
                    bytes: Vec::new(),
                    dest: self.dest(msg, MessageType::Offer),
                    msg: m,
                }));
        }
        if node.is_none() && self.cfg.unknown == UnknownPolicy::Ignore {
            debug!(%mac, ?mtype, "ignoring unknown machine");
            return Ok(None);
        }
        let Some(subnet) = self.subnet_for(msg)? else {
            debug!(%mac, giaddr = %msg.giaddr(), "no configured subnet for this request");
            return Ok(None);
        };
        match mtype {
            MessageType::Discover => self.discover(msg, mac, node.as_ref(), &subnet, &client),
            MessageType::Request => self.request(msg, mac, node.as_ref(), &subnet, &client),
            MessageType::Release => {
                if let Some(l) = self.leases()?.get(mac) {
                    if l.ip == msg.ciaddr() {
                        self.leases()?.release(mac, si_inventory::now())?;
                        info!(%mac, ip = %l.ip, "released");
                    }
                }
                Ok(None)
            }
            MessageType::Decline => {
                let Some(DhcpOption::RequestedIpAddress(ip)) =
                    msg.opts().get(OptionCode::RequestedIpAddress)
                else {
                    return Ok(None);
                };
                let ip = *ip;
                if !subnet.in_pool(ip) {
                    return Ok(None);
                }
                // Only the address this client was offered or holds: a DECLINE is unauthenticated,
                // and one naming any other address would let a single MAC empty the pool.
                let now = si_inventory::now();
                let offered = self.offers().get(mac, now);
                let leased = self.leases()?.get(mac).map(|l| l.ip);
                if offered != Some(ip) && leased != Some(ip) {
                    warn!(%mac, %ip, ?offered, ?leased, "DECLINE of an address this client was not given: ignored");
                    return Ok(None);
                }
                if let Err(why) = self.declines().allow(mac, now) {
                    warn!(%mac, %ip, why, "DECLINE over its bound: ignored");
                    return Ok(None);
                }
                let hold = i64::from(subnet.lease_time).clamp(1, QUARANTINE_MAX);
                warn!(%mac, %ip, seconds = hold, "client declined address (in use?): quarantined");
                self.offers().remove(mac);
                self.leases()?.remove(mac)?;
                self.leases()?.put(Lease {
                    mac: format!("declined/{ip}"),
                    ip,
                    expires: Some(now + hold),
                    state: "declined".into(),
                    hostname: None,
                })?;
                Ok(None)
            }
            MessageType::Inform => {
                let mut r = self.base_reply(msg, MessageType::Ack);
                r.set_ciaddr(msg.ciaddr());
                self.add_subnet_options(&mut r, &subnet, node.as_ref());
                self.add_boot(&mut r, mac, node.as_ref(), &client, false);
                Ok(Some(Reply {
                    bytes: Vec::new(),
                    dest: self.dest(msg, MessageType::Ack),
                    msg: r,
                }))
            }
            _ => Ok(None),
        }
    }

    fn discover(
        &self,
        msg: &Message,
        mac: &str,
        node: Option<&Node>,
        subnet: &Subnet,
        client: &Client,
    ) -> Result<Option<Reply>> {
        let requested = requested_ip(msg);
        let now = si_inventory::now();
        let Some(g) = self.allocate(mac, node, subnet, requested, now)? else {
            warn!(%mac, subnet = %subnet.name, "no address available");
            return Ok(None);
        };
        // Hold the address for the offer (in memory: nothing is written for an offer).
        let hold = now + i64::from(self.cfg.offer_hold.max(1));
        if !self.offers().insert(mac, g.ip, hold, now) {
            warn!(%mac, "too many outstanding offers");
            return Ok(None);
        }
        let mut r = self.base_reply(msg, MessageType::Offer);
        r.set_yiaddr(g.ip);
        self.add_lease_options(&mut r, g.lease);
        self.add_subnet_options(&mut r, subnet, node);
        self.add_boot(&mut r, mac, node, client, false);
        info!(%mac, ip = %g.ip, node = node.map(|n| n.name.as_str()).unwrap_or("-"), firmware = ?client.firmware(), ipxe = client.ipxe, "offer");
        Ok(Some(Reply {
            bytes: Vec::new(),
            dest: self.dest(msg, MessageType::Offer),
            msg: r,
        }))
    }

    fn request(
        &self,
        msg: &Message,
        mac: &str,
        node: Option<&Node>,
        subnet: &Subnet,
        client: &Client,
    ) -> Result<Option<Reply>> {
        let server_id = match msg.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(s)) => Some(*s),
            _ => None,
        };
        if let Some(s) = server_id {
            if s != self.server_ip {
                // The client took another server's offer: free ours.
                self.offers().remove(mac);
                return Ok(None);
            }
        }
        let addr = requested_ip(msg).or_else(|| Some(msg.ciaddr()).filter(|a| !a.is_unspecified()));
        let Some(addr) = addr else {
            debug!(%mac, "REQUEST without an address");
            return Ok(None);
        };
        let now = si_inventory::now();
        let grant = if self.acceptable(mac, node, subnet, addr, now)? {
            Some(Grant {
                ip: addr,
                lease: self.lease_time(node, subnet),
            })
        } else {
            None
        };
        let Some(g) = grant else {
            info!(%mac, %addr, "NAK");
            let mut r = self.base_reply(msg, MessageType::Nak);
            r.opts_mut().insert(DhcpOption::Message(format!(
                "address {addr} is not available for this client"
            )));
            // RFC 2131 4.3.2: a NAK is broadcast unless relayed.
            let dest = if msg.giaddr().is_unspecified() {
                SocketAddrV4::new(Ipv4Addr::BROADCAST, self.cfg.client_port)
            } else {
                SocketAddrV4::new(msg.giaddr(), self.cfg.port)
            };
            return Ok(Some(Reply {
                bytes: Vec::new(),
                dest,
                msg: r,
            }));
        };
        self.leases()?.put(Lease {
            mac: mac.to_string(),
            ip: g.ip,
            expires: g.lease.map(|l| now + i64::from(l)),
            state: "bound".into(),
            hostname: node.map(hostname),
        })?;
        self.offers().remove(mac);
        let mut r = self.base_reply(msg, MessageType::Ack);
        r.set_yiaddr(g.ip);
        r.set_ciaddr(msg.ciaddr());
        self.add_lease_options(&mut r, g.lease);
        self.add_subnet_options(&mut r, subnet, node);
        self.add_boot(&mut r, mac, node, client, false);
        info!(%mac, ip = %g.ip, node = node.map(|n| n.name.as_str()).unwrap_or("-"), lease = ?g.lease, "ack");
        Ok(Some(Reply {
            bytes: Vec::new(),
            dest: self.dest(msg, MessageType::Ack),
            msg: r,
        }))
    }

    /// The subnet a request belongs to: the relay's (giaddr) or the one of our interface.
    fn subnet_for(&self, msg: &Message) -> Result<Option<Subnet>> {
        let key = if msg.giaddr().is_unspecified() {
            self.server_ip
        } else {
            msg.giaddr()
        };
        Ok(self.reader.subnets()?.into_iter().find(|s| s.contains(key)))
    }

    fn lease_time(&self, node: Option<&Node>, subnet: &Subnet) -> Option<u32> {
        if subnet.permanent || node.is_some_and(|n| n.permanent) {
            None
        } else {
            Some(subnet.lease_time)
        }
    }

    /// May `mac` hold `addr` in `subnet`?
    fn acceptable(
        &self,
        mac: &str,
        node: Option<&Node>,
        subnet: &Subnet,
        addr: Ipv4Addr,
        now: i64,
    ) -> Result<bool> {
        if let Some(ip) = node.and_then(|n| n.ip) {
            return Ok(ip == addr && subnet.contains(ip));
        }
        Ok(subnet.in_pool(addr) && !self.taken(addr, mac, now)?)
    }

    /// Whether `ip` is held by anyone but `mac`: a node's address, a lease, an offer.
    fn taken(&self, ip: Ipv4Addr, mac: &str, now: i64) -> Result<bool> {
        Ok(self.offers().held_by_other(ip, mac, now)
            || self.leases()?.held_by_other(ip, mac, now)
            || self.reader.static_ip_taken(ip, mac)?)
    }

    fn offers(&self) -> std::sync::MutexGuard<'_, Offers> {
        self.offers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn declines(&self) -> std::sync::MutexGuard<'_, Declines> {
        self.declines.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Chooses an address: the node's static one, else its current lease, else the requested
    /// address, else the next free one of the pool.
    fn allocate(
        &self,
        mac: &str,
        node: Option<&Node>,
        subnet: &Subnet,
        requested: Option<Ipv4Addr>,
        now: i64,
    ) -> Result<Option<Grant>> {
        let lease = self.lease_time(node, subnet);
        if let Some(ip) = node.and_then(|n| n.ip) {
            if !subnet.contains(ip) {
                warn!(%mac, %ip, subnet = %subnet.name, "node address is not in the request's subnet");
                return Ok(None);
            }
            return Ok(Some(Grant { ip, lease }));
        }
        let offered = self.offers().get(mac, now);
        if let Some(ip) = offered {
            if self.acceptable(mac, node, subnet, ip, now)? {
                return Ok(Some(Grant { ip, lease }));
            }
        }
        if let Some(l) = self.leases()?.get(mac) {
            if self.acceptable(mac, node, subnet, l.ip, now)? {
                return Ok(Some(Grant { ip: l.ip, lease }));
            }
        }
        if let Some(ip) = requested {
            if self.acceptable(mac, node, subnet, ip, now)? {
                return Ok(Some(Grant { ip, lease }));
            }
        }
        let (Some(a), Some(b)) = (subnet.pool_start, subnet.pool_end) else {
            return Ok(None);
        };
        let (a, b) = (u32::from(a), u32::from(b));
        let size = (b - a).saturating_add(1).min(MAX_SCAN);
        let start = self.cursor.load(Ordering::Relaxed) % size;
        for i in 0..size {
            let off = (start + i) % size;
            let ip = Ipv4Addr::from(a + off);
            if ip == self.server_ip || ip == subnet.network || ip == subnet.broadcast() {
                continue;
            }
            if !self.taken(ip, mac, now)? {
                self.cursor.store(off.wrapping_add(1), Ordering::Relaxed);
                return Ok(Some(Grant { ip, lease }));
            }
        }
        Ok(None)
    }

    fn base_reply(&self, req: &Message, mtype: MessageType) -> Message {
        let mut r = Message::default();
        r.set_opcode(Opcode::BootReply)
            .set_htype(req.htype())
            .set_xid(req.xid())
            .set_secs(0)
            .set_flags(req.flags())
            .set_giaddr(req.giaddr())
            .set_chaddr(req.chaddr())
            .set_ciaddr(Ipv4Addr::UNSPECIFIED)
            .set_yiaddr(Ipv4Addr::UNSPECIFIED)
            .set_siaddr(Ipv4Addr::UNSPECIFIED);
        r.opts_mut().insert(DhcpOption::MessageType(mtype));
        r.opts_mut()
            .insert(DhcpOption::ServerIdentifier(self.server_ip));
        r
    }

    fn add_lease_options(&self, r: &mut Message, lease: Option<u32>) {
        match lease {
            None => {
                r.opts_mut().insert(DhcpOption::AddressLeaseTime(INFINITE));
            }
            Some(l) => {
                r.opts_mut().insert(DhcpOption::AddressLeaseTime(l));
                r.opts_mut().insert(DhcpOption::Renewal(l / 2));
                r.opts_mut()
                    .insert(DhcpOption::Rebinding((u64::from(l) * 7 / 8) as u32));
            }
        }
    }

    fn add_subnet_options(&self, r: &mut Message, s: &Subnet, node: Option<&Node>) {
        let o = r.opts_mut();
        o.insert(DhcpOption::SubnetMask(s.mask()));
        o.insert(DhcpOption::BroadcastAddr(s.broadcast()));
        if let Some(rt) = s.router {
            o.insert(DhcpOption::Router(vec![rt]));
        }
        if !s.dns.is_empty() {
            o.insert(DhcpOption::DomainNameServer(s.dns.clone()));
        }
        if let Some(d) = &s.domain {
            o.insert(DhcpOption::DomainName(d.clone()));
        }
        if let Some(n) = node {
            o.insert(DhcpOption::Hostname(hostname(n)));
        }
    }

    fn expand(&self, template: &str, mac: &str, node: Option<&Node>) -> String {
        template
            .replace("{http}", &self.http_base)
            .replace("{server}", &self.server_ip.to_string())
            .replace("{mac}", &mac.replace(':', "-"))
            .replace("{name}", node.map(|n| n.name.as_str()).unwrap_or("unknown"))
    }

    /// Adds boot information for PXE/iPXE/HTTP clients; returns whether the client got some.
    fn add_boot(
        &self,
        r: &mut Message,
        mac: &str,
        node: Option<&Node>,
        c: &Client,
        proxy: bool,
    ) -> bool {
        if !c.pxe && !c.http {
            return false;
        }
        // A UEFI node that boots its disk gets no boot file from its firmware's PXE or HTTP
        // client: the firmware's boot manager moves on to its next boot option, the disk. (An
        // iPXE chained only to `exit` does not come back to every firmware: Debian 12's iPXE
        // hangs in OVMF.) The node keeps its address, and the next change of its boot action
        // takes effect at its next network boot, which stays first in its boot order.
        let uefi = matches!(
            c.firmware(),
            Firmware::UefiX64 | Firmware::UefiArm64 | Firmware::UefiHttp
        );
        if uefi && !c.ipxe && node.is_some_and(|n| n.boot == si_inventory::BootAction::Local) {
            info!(%mac, node = node.map(|n| n.name.as_str()).unwrap_or("-"), "local boot: no boot file for the UEFI firmware");
            return false;
        }
        let b = &self.cfg.boot;
        let template = if c.ipxe {
            if node.is_some() {
                &b.ipxe_script
            } else {
                &b.discovery_script
            }
        } else {
            match c.firmware() {
                Firmware::UefiHttp => &b.uefi_http,
                Firmware::Bios => &b.bios,
                Firmware::UefiX64 => &b.uefi_x64,
                Firmware::UefiArm64 => &b.uefi_arm64,
                Firmware::Other(a) => {
                    warn!(%mac, arch = a, "no boot file for this client architecture");
                    return false;
                }
            }
        };
        let file = self.expand(template, mac, node);
        // A file named without a scheme is fetched by TFTP, whoever the client is (an iPXE
        // script kept in the TFTP root too): say which server has it, as dnsmasq's
        // `--dhcp-boot=FILE,,SERVER` does. A URL names its server itself.
        let tftp = !is_url(&file);
        if c.http {
            r.opts_mut()
                .insert(DhcpOption::ClassIdentifier(b"HTTPClient".to_vec()));
        } else {
            r.opts_mut()
                .insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
            if !c.ipxe {
                // PXE_DISCOVERY_CONTROL = 8: boot the file named here, no boot server
                // discovery or menu.
                r.opts_mut()
                    .insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
            }
        }
        if let Some(u) = &c.uuid {
            r.opts_mut()
                .insert(DhcpOption::ClientMachineIdentifier(u.clone()));
        }
        if tftp || proxy {
            r.set_siaddr(self.next_server);
            r.opts_mut().insert(DhcpOption::TFTPServerName(
                self.next_server.to_string().into_bytes(),
            ));
        }
        if file.len() < 128 {
            r.set_fname_str(&file);
        }
        // NUL-terminated, as dnsmasq sends it: edk2's PXE and HTTP boot clients (OVMF) append a
        // NUL after option 67 in their copy of an offer when there is none, overwriting the
        // code of the option that follows. Depending on which option that is, the copy they
        // select loses its message type and mask, the selection fails, and the same copy is
        // selected again after every retry: `PXE-E16: No valid offer received` or `Server
        // response timeout` (seen with options in random order, reproduced with a forced one).
        let mut file = file.into_bytes();
        file.push(0);
        r.opts_mut().insert(DhcpOption::BootfileName(file));
        true
    }

    /// A ProxyDHCP answer: boot information and no address.
    fn proxy_reply(
        &self,
        msg: &Message,
        mac: &str,
        node: Option<&Node>,
        c: &Client,
        mtype: MessageType,
    ) -> Option<Message> {
        if !c.pxe && !c.http {
            return None;
        }
        if node.is_none() && self.cfg.unknown == UnknownPolicy::Ignore {
            debug!(%mac, "proxy: ignoring unknown machine");
            return None;
        }
        let mut r = self.base_reply(msg, mtype);
        r.set_ciaddr(msg.ciaddr());
        if !self.add_boot(&mut r, mac, node, c, true) {
            return None;
        }
        info!(%mac, ?mtype, file = ?r.fname_str(), "proxy boot answer");
        Some(r)
    }

    /// RFC 2131 4.1: relay → giaddr:67; client with an address → ciaddr:68; else broadcast.
    fn dest(&self, req: &Message, mtype: MessageType) -> SocketAddrV4 {
        if !req.giaddr().is_unspecified() {
            SocketAddrV4::new(req.giaddr(), self.cfg.port)
        } else if !req.ciaddr().is_unspecified() && mtype != MessageType::Nak {
            SocketAddrV4::new(req.ciaddr(), self.cfg.client_port)
        } else {
            // Without raw sockets we cannot unicast to a client that has no address yet (no
            // ARP entry): broadcast, which every client accepts.
            SocketAddrV4::new(Ipv4Addr::BROADCAST, self.cfg.client_port)
        }
    }
}

/// Options read from requests, and whether a length is valid for them.
fn option_ok(code: u8, len: usize) -> bool {
    match code {
        53 => len == 1,                 // message type
        50 | 51 | 54 => len == 4,       // requested address, lease time, server identifier
        57 => len == 2,                 // maximum message size
        60 | 77 | 97 => len >= 1,       // vendor class, user class, client UUID
        93 => len >= 2 && len & 1 == 0, // client architectures
        94 => len == 3,                 // client network interface
        _ => false,
    }
}

/// The fixed header and the known, well-formed options of `buf` (first occurrence of each),
/// and the raw relay agent information (option 82) to echo; `None` when the header or the
/// option framing is broken.
fn sanitize(buf: &[u8]) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
    if buf.len() < MIN_LEN || buf[236..240] != v4::MAGIC {
        return None;
    }
    let mut out = Vec::with_capacity(buf.len().min(MAX_LEN));
    out.extend_from_slice(&buf[..MIN_LEN]);
    let mut seen = [false; 256];
    let mut relay_info = None;
    let mut i = MIN_LEN;
    while i < buf.len() {
        let code = buf[i];
        match code {
            0 => {
                i += 1;
                continue;
            }
            255 => break,
            _ => {}
        }
        let len = usize::from(*buf.get(i + 1)?);
        let data = buf.get(i + 2..i + 2 + len)?;
        if code == 82 && relay_info.is_none() && len > 0 {
            relay_info = Some(data.to_vec());
        }
        if option_ok(code, len) && !seen[usize::from(code)] {
            seen[usize::from(code)] = true;
            out.push(code);
            out.push(len as u8);
            out.extend_from_slice(data);
        }
        i += 2 + len;
    }
    out.push(255);
    Some((out, relay_info))
}

/// The encoded message `bytes` with its options in a fixed order: message type (53) first,
/// then by code, relay agent information (82) last as RFC 3046 2.1 requires (dhcproto does not
/// put it there). dhcproto writes options in the order of a hash map, which changes from
/// packet to packet: a client that cares about the order (see the option 67 note in
/// `add_boot`) then fails now and then instead of every time.
/// `None` if the options cannot be walked (never for a message dhcproto encoded).
fn fixed_option_order(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut opts: Vec<&[u8]> = Vec::new();
    let mut i = MIN_LEN;
    loop {
        match *bytes.get(i)? {
            255 => break,
            0 => i += 1,
            _ => {
                let len = usize::from(*bytes.get(i + 1)?);
                opts.push(bytes.get(i..i + 2 + len)?);
                i += 2 + len;
            }
        }
    }
    // Stable: the parts of an option split in several (RFC 3396) keep their order.
    opts.sort_by_key(|o| match o[0] {
        53 => (0, 53),
        82 => (2, 82),
        c => (1, c),
    });
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(bytes.get(..MIN_LEN)?);
    for o in opts {
        out.extend_from_slice(o);
    }
    out.extend_from_slice(&bytes[i..]);
    Some(out)
}

/// Whether a boot file is a URL (`http://…`, `https://…`, `tftp://…`) rather than a TFTP path.
fn is_url(file: &str) -> bool {
    file.split_once("://").is_some_and(|(scheme, _)| {
        !scheme.is_empty()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    })
}

fn requested_ip(msg: &Message) -> Option<Ipv4Addr> {
    match msg.opts().get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    }
}

fn hostname(n: &Node) -> String {
    n.hostname.clone().unwrap_or_else(|| n.name.clone())
}

/// Decodes a reply (tests, tools).
pub fn decode(buf: &[u8]) -> Result<Message> {
    Message::decode(&mut Decoder::new(buf)).context("decoding DHCP message")
}

#[cfg(test)]
mod tests;
