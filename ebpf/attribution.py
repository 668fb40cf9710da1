"""Which local socket and process a flow belongs to, and that socket's TCP health.

Sources, best first:
- the socket cookie the egress counting program saw on the flow's own packets;
- the cookie already linked to the connection (the other direction's packets);
- for UDP/ICMP servers, the socket bound to the local port (ingress-only flows);
- for TCP, the process of the listener on the local port (kernel-side inheritance at
  PASSIVE_ESTABLISHED normally covers accepted sockets already).
Process facts per cookie come from the kernel `socks` map (filled in process context by the
cgroup hooks), from end-of-socket events, and from the start-up scan of existing sockets.
"""

from __future__ import annotations

from ebpf import bpfsys, layout
from ebpf.layout import ConnId, SockInfo
from ebpf.observation import ProcessInfo, TcpHealth

TCP = 6
# sock_info.origin (flows.bpf.c): 2 connect(), 4 inherited from the listener at accept,
# 6 found by the start-up scan on a listening port.
INITIATED_BY_ORIGIN = {2: True, 4: False, 6: False}


class Attribution:
    def __init__(self, socks_reader: bpfsys.BatchReader, scoped: bool) -> None:
        self.scoped = scoped  # only flows of sockets the cgroup hooks saw are reported
        self._reader = socks_reader
        self._socks: dict[int, SockInfo] = {}
        self._port_owner: dict[tuple[int, int, int], int] = {}
        self._conn_cookie: dict[ConnId, int] = {}
        # A socket's connection, or a set of them (an unconnected UDP socket has many): a set
        # for every TCP socket, which has one, cost ~130 bytes a flow at 100k connections.
        self._cookie_conns: dict[int, ConnId | set[ConnId]] = {}
        self._health: dict[ConnId, TcpHealth] = {}
        self._refreshed = False

    def new_poll(self) -> None:
        self._refreshed = False

    def known_sockets(self) -> int:
        return len(self._socks)

    def _refresh(self) -> None:
        """Read the kernel's socket map (at most once per poll)."""
        self._refreshed = True
        size = layout.SOCK_INFO.size
        for keys, values in self._reader.read():
            for i in range(len(keys) // 8):
                cookie = layout.U64.unpack_from(keys, i * 8)[0]
                info = layout.decode_sock_info(values, i * size)
                if info is not None:
                    self.remember(cookie, info)

    def remember(self, cookie: int, info: SockInfo) -> None:
        self._socks[cookie] = info
        if info.bound_port:
            self._port_owner[(info.netns, info.protocol, info.bound_port)] = cookie

    def _link(self, conn: ConnId, cookie: int) -> None:
        old = self._conn_cookie.get(conn)
        if old == cookie:
            return
        if old:
            self._unlink(old, conn)
        self._conn_cookie[conn] = cookie
        held = self._cookie_conns.get(cookie)
        if held is None:
            self._cookie_conns[cookie] = conn
        elif type(held) is set:
            held.add(conn)
        elif held != conn:
            self._cookie_conns[cookie] = {held, conn}

    def _unlink(self, cookie: int, conn: ConnId) -> None:
        held = self._cookie_conns.get(cookie)
        if type(held) is set:
            held.discard(conn)
        elif held == conn:
            del self._cookie_conns[cookie]

    def learn_from_egress(self, conn: ConnId, value: layout.FlowValue) -> None:
        if value.cookie:
            self._link(conn, value.cookie)
        if conn[1] == TCP and (value.srtt_us or value.snd_cwnd):
            self._health[conn] = TcpHealth(
                retrans_packets=value.retrans_packets,
                retrans_bytes=value.retrans_bytes,
                srtt_us=value.srtt_us,
                min_rtt_us=value.min_rtt_us,
                snd_cwnd=value.snd_cwnd,
                state=value.state,
            )

    def learn_existing(self, conn: ConnId, sock, process: ProcessInfo) -> None:
        """A socket found by the start-up scan (ebpf.existing.ExistingSocket)."""
        bound = sock.local_port if not any(sock.remote_addr) else 0
        origin = 6 if sock.accepted else 5
        info = SockInfo(conn[0], process, bound, sock.protocol, origin)
        self.remember(sock.cookie, info)
        if not bound:
            self._link(conn, sock.cookie)
        if sock.tcp is not None and not bound:
            # Retransmissions are counted from attach time on, like bytes and packets.
            self._health[conn] = TcpHealth(0, 0, sock.tcp.srtt_us, sock.tcp.min_rtt_us,
                                           sock.tcp.snd_cwnd, sock.tcp.state)

    def resolve(self, conn: ConnId, cookie: int
                ) -> tuple[int, ProcessInfo | None, bool | None]:
        """(socket cookie or 0, process or None, local_initiated) for a connection."""
        if not cookie:
            cookie = self._conn_cookie.get(conn, 0)
        info = self._socks.get(cookie) if cookie else None
        owner_key = (conn[0], conn[1], conn[4])
        if info is None and not self._refreshed and (cookie or owner_key not in self._port_owner):
            self._refresh()
            info = self._socks.get(cookie) if cookie else None
        initiated = None if info is None else INITIATED_BY_ORIGIN.get(info.origin)
        if info is None:
            owner = self._port_owner.get(owner_key)
            if owner is not None:
                info = self._socks.get(owner)
                if conn[1] == TCP and info is not None:
                    initiated = False  # a connection on a listening port was accepted
                if not cookie and conn[1] != TCP:
                    # An unconnected UDP/ICMP server socket receives for its port; a TCP
                    # listener does not own its accepted connections.
                    cookie = owner
        if cookie:
            self._link(conn, cookie)
        if conn[1] != TCP:
            initiated = None
        return cookie, (info.process if info is not None else None), initiated

    def health(self, conn: ConnId) -> TcpHealth | None:
        return self._health.get(conn)

    def conns_of_cookie(self, cookie: int) -> set[ConnId]:
        held = self._cookie_conns.get(cookie)
        if held is None:
            return set()
        return set(held) if type(held) is set else {held}

    def forget_conn(self, conn: ConnId) -> None:
        cookie = self._conn_cookie.pop(conn, None)
        if cookie is not None:
            self._unlink(cookie, conn)
        self._health.pop(conn, None)

    def cookie_tables(self) -> tuple[dict, dict]:
        """The tables keyed by socket cookie, for a loop over many ended sockets to test first
        (`in`) and call forget_cookie only for a cookie one holds: the call costs ~100 ns more
        than the two tests, and most sockets that end under churn were never looked up."""
        return self._cookie_conns, self._socks

    def forget_cookie(self, cookie: int) -> None:
        held = self._cookie_conns.pop(cookie, None)
        for conn in held if type(held) is set else (held,) if held is not None else ():
            self._conn_cookie.pop(conn, None)
            self._health.pop(conn, None)
        info = self._socks.pop(cookie, None)
        if info is not None and info.bound_port:
            key = (info.netns, info.protocol, info.bound_port)
            if self._port_owner.get(key) == cookie:
                del self._port_owner[key]
