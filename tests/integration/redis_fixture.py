"""Real Redis servers for tests: one redis-server, or a Redis Cluster, on free loopback ports.

Standard library only (no redis-py). Every process is started here, stopped here by its PID,
and lives in its own temp dir without persistence (`--save '' --appendonly no`), so the
Debian redis-server service and port 6379 never matter. Backstops: an atexit hook stops
whatever a test forgot, and each redis-server gets SIGKILL from the kernel if the thread
that started it dies (PR_SET_PDEATHSIG), so even a killed test run leaves no server behind.
Start servers from a thread that outlives them (the main thread, setUp, setUpClass).

    from redis_fixture import RedisServer, RedisCluster, RespClient, RespError

    with RedisServer() as r:                       # r.port, r.address == "127.0.0.1:P", r.pid
        c = RespClient(r.address)
        c.call("SET", "k", "v", "EX", 10)          # -> "OK"
        c.call("TTL", "k")                         # -> 10
        c.call("EVAL", "return {1, 'a'}", 0)       # -> [1, "a"]
        r.restart()                                # same port; the data is gone (no persistence)
        r.kill()                                   # SIGKILL; r.restart() brings it back

    cluster = RedisCluster()                       # 3 masters + 3 replicas, cluster_state:ok
    cluster.masters()                              # [(address, pid, [(first, last), ...]), ...]
    cluster.client_for("sluice:{user:1}")          # RespClient to the master owning that slot
    promoted = cluster.kill_master(0)              # address of the replica that took over
    cluster.stop()

Replies: simple strings are str, bulk strings str (bytes with decode=False), integers int,
nil None, arrays lists; an error reply raises RespError (inside an array it is returned as a
RespError instance, as EXEC and pipeline() answer them).
Environment: SLUICE_REDIS_SERVER / SLUICE_REDIS_CLI override the binaries' paths.
"""
import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

REDIS_SERVER = os.environ.get("SLUICE_REDIS_SERVER") or shutil.which("redis-server") or "redis-server"
REDIS_CLI = os.environ.get("SLUICE_REDIS_CLI") or shutil.which("redis-cli") or "redis-cli"
SLOTS = 16384

__all__ = ["RedisServer", "RedisCluster", "RespClient", "RespError", "key_slot", "free_port"]


# ---------------------------------------------------------------------------------------------
# RESP client


class RespError(Exception):
    """An error reply from Redis ("ERR ...", "MOVED 123 127.0.0.1:7001", "NOAUTH ...")."""


class RespClient:
    """A minimal blocking RESP2 client: one connection, one command at a time (or a pipeline)."""

    def __init__(self, address, password=None, timeout=5.0, decode=True, username=None):
        host, port = address.rsplit(":", 1)
        self.address = address
        self.decode = decode
        self.sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader = self.sock.makefile("rb")
        if password is not None:
            try:
                self.call("AUTH", *([username] if username else []), password)
            except BaseException:
                self.close()
                raise

    def call(self, *args):
        """Sends one command and returns its parsed reply; raises RespError on an error reply."""
        self.sock.sendall(self._encode(args))
        reply = self._read()
        if isinstance(reply, RespError):
            raise reply
        return reply

    def pipeline(self, *commands):
        """Sends several commands (each a tuple) at once; returns their replies in order,
        errors as RespError instances (not raised)."""
        self.sock.sendall(b"".join(self._encode(c) for c in commands))
        return [self._read() for _ in commands]

    def close(self):
        try:
            self._reader.close()
        finally:
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @staticmethod
    def _encode(args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            if isinstance(a, bytes):
                b = a
            elif isinstance(a, (int, float)) and not isinstance(a, bool):
                b = repr(a).encode()
            else:
                b = str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        return b"".join(out)

    def _line(self):
        line = self._reader.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError(f"connection to {self.address} closed")
        return line[:-2]

    def _read(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RespError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self._reader.read(n + 2)
            if len(data) != n + 2:
                raise ConnectionError(f"connection to {self.address} closed")
            data = data[:-2]
            return data.decode(errors="surrogateescape") if self.decode else data
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise ConnectionError(f"unexpected RESP reply from {self.address}: {line[:80]!r}")


def parse_info(text):
    """INFO's or CLUSTER INFO's "field:value" lines as a dict of str."""
    out = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith("#"):
            k, v = line.split(":", 1)
            out[k] = v.strip()
    return out


# ---------------------------------------------------------------------------------------------
# Process bookkeeping

_live = set()  # every RedisServer / RedisCluster not stopped yet
_live_lock = threading.Lock()


def _stop_all():
    with _live_lock:
        left = list(_live)
    for obj in left:
        try:
            obj.stop()
        except Exception:  # a backstop must not raise
            pass


atexit.register(_stop_all)

try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:
    _libc = None

_SETPRIV = shutil.which("setpriv")


def _die_with_parent():  # runs in the child between fork and exec
    if _libc is not None:
        _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(args, **kw):
    """subprocess.Popen for a process that must not outlive the test: SIGKILLed when the
    test process dies (PR_SET_PDEATHSIG). setpriv (util-linux) sets it in the child, so
    Python starts it without fork handlers (by vfork): a fork() while grpcio's threads run
    can abort grpcio (its thread pool asserts while forking). The PID is the program's:
    setpriv execs it."""
    if _SETPRIV:
        return subprocess.Popen([_SETPRIV, "--pdeathsig", "KILL", *args], **kw)
    return subprocess.Popen(args, preexec_fn=_die_with_parent, **kw)


_ports_given = set()


def port_taken(log):
    """Whether a sluice log says it exited because a port it was given was taken meanwhile
    (free_port's ports are free when picked, not reserved)."""
    return "cannot listen on" in log and "Address already in use" in log


def read_log(f):
    """The text of a file a child process writes its output to, read at its offsets with
    pread: a seek on the shared file description would move the child's write position, and
    a line it wrote then would overwrite the file's start."""
    fd = f.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")


@contextlib.contextmanager
def freed_memory_returned():
    """Processes started inside return the memory they free to the system at once (mimalloc's
    purge and reset options), so a test can read what they still hold from VmRSS."""
    purge_now = {"MIMALLOC_PURGE_DELAY": "0", "MIMALLOC_RESET_DELAY": "0",
                 "MIMALLOC_PAGE_RESET": "1", "MIMALLOC_RESET_DECOMMITS": "1"}
    saved = {k: os.environ.get(k) for k in purge_now}
    os.environ.update(purge_now)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def free_port():
    """A TCP port free on 127.0.0.1 right now (the kernel's pick), never one this process
    handed out before: two picks in a row can be the same port."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ports_given:
            _ports_given.add(port)
            return port


def _wait(cond, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = cond()
            if result:
                return result
        except (OSError, RespError) as e:
            last = e
        time.sleep(interval)
    raise TimeoutError(f"{what} not within {timeout}s" + (f" (last error: {last})" if last else ""))


# ---------------------------------------------------------------------------------------------
# One redis-server


class _PortTaken(Exception):
    pass


class RedisServer:
    """One redis-server on 127.0.0.1, in its own temp dir, without persistence.

    port: None picks a free one (and retries on a lost race); password: --requirepass.
    extra_args: more redis-server arguments; "{port}" in one is replaced by the port.
    """

    def __init__(self, port=None, password=None, extra_args=(), start_timeout=10.0):
        self.password = password
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self._fixed_port = port is not None
        self.port = port
        self.proc = None
        self._log = None
        self.dir = tempfile.mkdtemp(prefix="sluice-redis-")
        with _live_lock:
            _live.add(self)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def client(self, **kw):
        """A new RespClient to this server (authenticated when it has a password)."""
        return RespClient(self.address, password=self.password, **kw)

    def call(self, *args):
        """One command on a fresh connection."""
        with self.client() as c:
            return c.call(*args)

    def log(self):
        try:
            with open(os.path.join(self.dir, "redis.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _start(self):
        for _ in range(5):
            if not self._fixed_port:
                self.port = free_port()
            try:
                self._spawn()
                self._wait_ready()
                return
            except _PortTaken:
                self._terminate(signal.SIGKILL)
                if self._fixed_port:
                    raise RuntimeError(f"redis-server: port {self.port} is taken")
        raise RuntimeError("redis-server: no free port after 5 tries")

    def _spawn(self):
        os.makedirs(self.dir, exist_ok=True)
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", self.dir,
                "--logfile", ""]
        if self.password is not None:
            args += ["--requirepass", self.password]
        args += [a.replace("{port}", str(self.port)) for a in self.extra_args]
        self._log = open(os.path.join(self.dir, "redis.log"), "ab")
        self.proc = spawn(args, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=self.dir)

    def _wait_ready(self):
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log()
                if "Address already in use" in log:
                    raise _PortTaken()
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{log[-2000:]}")
            try:
                with RespClient(self.address, password=self.password, timeout=1.0) as c:
                    if c.call("PING") == "PONG":
                        return
            except (OSError, RespError):
                pass
            time.sleep(0.02)
        raise TimeoutError(f"redis-server on {self.address} did not answer PING "
                           f"within {self.start_timeout}s:\n{self.log()[-2000:]}")

    def _terminate(self, sig):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self):
        """SIGKILL by PID and wait; the temp dir stays, so restart() can bring it back."""
        self._terminate(signal.SIGKILL)

    def restart(self):
        """Stops (SIGTERM) if running and starts again on the same port, empty."""
        self._terminate(signal.SIGTERM)
        with _live_lock:
            _live.add(self)
        self._spawn()
        try:
            self._wait_ready()
        except _PortTaken:
            self._terminate(signal.SIGKILL)
            raise RuntimeError(f"redis-server: port {self.port} was taken meanwhile")

    def stop(self):
        """SIGTERM by PID, wait (SIGKILL after 10 s), remove the temp dir. Idempotent."""
        self._terminate(signal.SIGTERM)
        shutil.rmtree(self.dir, ignore_errors=True)
        with _live_lock:
            _live.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return f"RedisServer({self.address}, pid={self.pid})"


# ---------------------------------------------------------------------------------------------
# Redis Cluster


def _crc16(data):  # CRC16-CCITT (XMODEM), Redis Cluster's key hash
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def key_slot(key):
    """The cluster slot of a key, hash tags ({...}) included."""
    k = key.encode() if isinstance(key, str) else bytes(key)
    start = k.find(b"{")
    if start >= 0:
        end = k.find(b"}", start + 1)
        if end > start + 1:
            k = k[start + 1:end]
    return _crc16(k) % SLOTS


class ClusterNode:
    """One line of CLUSTER NODES."""

    def __init__(self, line):
        parts = line.split()
        self.id = parts[0]
        self.address = parts[1].split("@")[0]
        self.flags = set(parts[2].split(","))
        self.master_id = None if parts[3] == "-" else parts[3]
        self.link = parts[7]
        self.slots = []
        for s in parts[8:]:
            if s.startswith("["):  # a slot being migrated or imported
                continue
            first, _, last = s.partition("-")
            self.slots.append((int(first), int(last or first)))

    @property
    def is_master(self):
        return "master" in self.flags

    @property
    def failed(self):
        return "fail" in self.flags or "fail?" in self.flags


class RedisCluster:
    """A Redis Cluster of masters * (1 + replicas_per_master) redis-server processes on free
    loopback ports, created with `redis-cli --cluster create`, ready (cluster_state:ok on every
    node, all 16384 slots covered, replicas in sync) when the constructor returns."""

    def __init__(self, masters=3, replicas_per_master=1, password=None, node_timeout_ms=1000,
                 timeout=30.0, require_full_coverage=True):
        self.password = password
        self.require_full_coverage = require_full_coverage
        self.timeout = timeout
        self.expected_masters = masters
        self.nodes = []
        with _live_lock:
            _live.add(self)
        try:
            for _ in range(masters * (1 + replicas_per_master)):
                self.nodes.append(self._start_node(node_timeout_ms))
            auth = ["-a", password, "--no-auth-warning"] if password is not None else []
            create = subprocess.run(
                [REDIS_CLI, *auth, "--cluster", "create", *self.addresses,
                 "--cluster-replicas", str(replicas_per_master), "--cluster-yes"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, timeout=timeout)
            if create.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout[-3000:]}")
            self.wait_ok()
        except BaseException:
            self.stop()
            raise

    def _start_node(self, node_timeout_ms):
        # The cluster bus listens on its own free port (--cluster-port), not on port + 10000,
        # which may be taken or past 65535.
        last = None
        for _ in range(5):
            bus = free_port()
            args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes-{port}.conf",
                    "--cluster-node-timeout", str(node_timeout_ms), "--cluster-port", str(bus),
                    # replicas sync at once instead of after diskless sync's 5 s delay
                    "--repl-diskless-sync-delay", "0",
                    "--cluster-require-full-coverage",
                    "yes" if self.require_full_coverage else "no"]
            if self.password is not None:
                args += ["--masterauth", self.password]
            try:
                return RedisServer(password=self.password, extra_args=args)
            except RuntimeError as e:  # e.g. the bus port was taken meanwhile
                last = e
        raise last

    @property
    def addresses(self):
        """Every node's "127.0.0.1:P", as started (killed ones included)."""
        return [n.address for n in self.nodes]

    def node(self, address):
        """The RedisServer at an address."""
        for n in self.nodes:
            if n.address == address:
                return n
        raise KeyError(address)

    def live_nodes(self):
        return [n for n in self.nodes if n.running()]

    def cluster_nodes(self, via=None):
        """CLUSTER NODES as seen by one live node (or `via`), as ClusterNode objects."""
        server = via or self.live_nodes()[0]
        text = server.call("CLUSTER", "NODES")
        return [ClusterNode(line) for line in text.splitlines() if line.strip()]

    def masters(self):
        """[(address, pid, [(first_slot, last_slot), ...]), ...] of the serving masters, in
        slot order."""
        out = []
        for cn in self.cluster_nodes():
            if cn.is_master and not cn.failed and cn.slots:
                out.append((cn.address, self.node(cn.address).pid, sorted(cn.slots)))
        return sorted(out, key=lambda m: m[2][0])

    def master_for(self, key):
        """The address of the master serving a key's slot."""
        slot = key_slot(key)
        for address, _, ranges in self.masters():
            if any(a <= slot <= b for a, b in ranges):
                return address
        raise RuntimeError(f"slot {slot} is not served")

    def client_for(self, key, **kw):
        """A RespClient to the master serving a key's slot."""
        return RespClient(self.master_for(key), password=self.password, **kw)

    def _node_ok(self, server, nodes_expected):
        info = parse_info(server.call("CLUSTER", "INFO"))
        if (info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOTS)
                or info.get("cluster_slots_assigned") != str(SLOTS)):
            return False
        if nodes_expected and info.get("cluster_known_nodes") != str(nodes_expected):
            return False
        repl = parse_info(server.call("INFO", "replication"))
        if repl.get("role") == "slave":
            return (repl.get("master_link_status") == "up"
                    and repl.get("master_sync_in_progress") == "0")
        return True

    def wait_ok(self, timeout=None):
        """Waits until every live node says cluster_state:ok with all slots covered and every
        live replica is in sync with its master."""
        def ok():
            live = self.live_nodes()
            view = self.cluster_nodes()
            masters = [m for m in view if m.is_master and not m.failed and m.slots]
            if len(masters) != self.expected_masters:
                return False
            live_addresses = {n.address for n in live}
            if any(cn.failed for cn in view if cn.address in live_addresses):
                return False  # a restarted node not seen as back yet
            return all(self._node_ok(n, len(self.nodes)) for n in live)
        _wait(ok, timeout or self.timeout, "cluster_state:ok on every node")

    def kill_master(self, i):
        """SIGKILLs masters()[i] by PID, waits until one of its replicas is promoted and the
        cluster is ok again, and returns the promoted replica's address."""
        nodes = self.cluster_nodes()
        address, _, slots = self.masters()[i]
        victim = next(n for n in nodes if n.address == address)
        replicas = {n.id: n.address for n in nodes if n.master_id == victim.id}
        if not replicas:
            raise RuntimeError(f"master {address} has no replica to take over")
        self.node(address).kill()

        def promoted():
            for cn in self.cluster_nodes():
                if cn.id in replicas and cn.is_master and not cn.failed and sorted(cn.slots) == slots:
                    return cn.address
            return None
        new = _wait(promoted, self.timeout, f"a replica of {address} promoted")
        self.wait_ok()
        return new

    def restart_node(self, address):
        """Starts a killed node again on its port with its nodes-P.conf (a killed master comes
        back as a replica of the one that replaced it); waits until the cluster is ok."""
        self.node(address).restart()
        self.wait_ok()

    def stop(self):
        """Stops every node by its PID (SIGTERM, then SIGKILL) and removes their temp dirs."""
        for n in self.nodes:
            n.stop()
        with _live_lock:
            _live.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
