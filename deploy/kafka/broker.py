#!/usr/bin/env python3
"""A local single-node Apache Kafka 4.x broker (KRaft, broker+controller in one) for dev and tests.

Jars come from Maven Central through deploy/kafka/pom.xml (so no tarball, no Docker); config,
data, logs, pid and state files all live in one cache dir: $VOICECLONE_KAFKA_HOME, default
<repo>/.cache/kafka.

    broker.py fetch      # download the jars once (marker: libs/.kafka-version)
    broker.py start      # idempotent; the last stdout line is bootstrap=HOST:PORT
    broker.py status     # exit 0 running, 1 running but not answering, 3 stopped
    broker.py bootstrap  # just HOST:PORT (exit 3 when stopped)
    broker.py client-env # VOICECLONE_KAFKA__* lines for a client of the SASL_SSL listener
    broker.py stop       # SIGTERM, then SIGKILL after --timeout (--kill: SIGKILL at once)
    broker.py tool NAME [ARGS...]  # one of Kafka's CLI tools, e.g. kafka-topics --list

`start --sasl-ssl` adds a SASL_SSL listener (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512; TLS client
certificates required) next to the plain one, with a throwaway CA, certificates and a password
made once under <home>/security with the openssl command.

`start --nodes 3` starts a local cluster instead: three combined broker+controller nodes, a
static KRaft quorum of all three, each node in its own folder <home>/node-N (config, data, logs,
pid, state; the jars shared from <home>/libs) on ports of its own; replication factor 3 and
min.insync.replicas=2 for every topic, Kafka's internal ones included. The home remembers its
node count (cluster.json), so the other commands act on every node: `start` again brings back
any node that is down, `stop --node N` stops one (`--kill`: SIGKILL at once, as a crash), and
`bootstrap` prints every node's address, comma-separated.

`tool` runs Kafka's own command-line tools (TOOLS below, named as Kafka's bin/ scripts) from the
same jars, with `--bootstrap-server` set to the running broker unless given.

Standard library only (the scaffolding it shares with the Schema Registry: deploy/jvm_service.py),
so it runs with any python3 >= 3.9, inside or outside the project venv.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))  # deploy/: the shared jvm_service module
from jvm_service import (  # noqa: E402
    EXIT_FAIL,
    EXIT_OK,
    EXIT_STOPPED,
    HOST,
    CacheDir,
    JvmService,
    ServiceError,
    add_common_arguments,
    await_answer,
    choose_port,
    daemonise,
    env_int,
    fetch_with_maven,
    file_size,
    find_java,
    home_flag,
    kill,
    locked,
    port_is_free,
    read_state,
    require_tool,
    reuse_running,
    run,
    running_pid,
    terminate,
    write_state,
)

POM = HERE / "pom.xml"
DEFAULT_HOME = HERE.parent.parent / ".cache" / "kafka"
DEFAULT_PORT = 9092
NODE_ID = 1
# C1-only JIT: ~30% faster broker start on small machines; set VOICECLONE_KAFKA_JVM_OPTS without
# it (e.g. "-Xmx1g") when measuring throughput.
DEFAULT_JVM_OPTS = "-Xms128m -Xmx512m -XX:TieredStopAtLevel=1"

# Kafka's command-line tools (the names of its bin/*.sh scripts) and their main classes, all in
# org.apache.kafka:kafka-tools. Each takes --bootstrap-server.
TOOLS = {
    "kafka-topics": "org.apache.kafka.tools.TopicCommand",
    "kafka-consumer-groups": "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
    "kafka-console-consumer": "org.apache.kafka.tools.consumer.ConsoleConsumer",
    "kafka-console-producer": "org.apache.kafka.tools.ConsoleProducer",
    "kafka-configs": "org.apache.kafka.tools.ConfigCommand",
    "kafka-get-offsets": "org.apache.kafka.tools.GetOffsetShell",
    "kafka-delete-records": "org.apache.kafka.tools.DeleteRecordsCommand",
    "kafka-transactions": "org.apache.kafka.tools.TransactionsCommand",
    "kafka-log-dirs": "org.apache.kafka.tools.LogDirsCommand",
    "kafka-metadata-quorum": "org.apache.kafka.tools.MetadataQuorumCommand",
    "kafka-broker-api-versions": "org.apache.kafka.tools.BrokerApiVersionsCommand",
}
# Either names the cluster to talk to; without one, `tool` adds the running broker's address.
BOOTSTRAP_FLAGS = ("--bootstrap-server", "--bootstrap-controller")

# The one user of the SASL_SSL listener, known to every mechanism it offers.
SASL_USER = "voiceclone"
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
CERT_DAYS = 825

# Logs to a file under the cache dir; the path comes in as a system property so this stays static.
LOG4J2_XML = """\
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <RollingFile name="file" fileName="${sys:kafka.logs.dir}/server.log"
                 filePattern="${sys:kafka.logs.dir}/server.log.%i">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
      <Policies><SizeBasedTriggeringPolicy size="20 MB"/></Policies>
      <DefaultRolloverStrategy max="3"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Root level="INFO"><AppenderRef ref="file"/></Root>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="org.apache.kafka.clients.NetworkClient" level="WARN"/>
  </Loggers>
</Configuration>
"""

# The tools log to stderr, warnings only (as Kafka's tools-log4j2.yaml), never to server.log.
TOOLS_LOG4J2_XML = """\
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <Console name="stderr" target="SYSTEM_ERR">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Root level="WARN"><AppenderRef ref="stderr"/></Root>
  </Loggers>
</Configuration>
"""


@dataclass(frozen=True)
class State:
    """What the last start chose; kept after stop so a restart can reuse the data dir."""

    pid: int
    port: int
    controller_port: int
    version: str
    cluster_id: str
    sasl_ssl_port: int | None = None  # None: no SASL_SSL listener
    scram: bool = False  # the data dir was formatted with the SCRAM credentials

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def sasl_ssl_bootstrap(self) -> str | None:
        return None if self.sasl_ssl_port is None else f"{HOST}:{self.sasl_ssl_port}"


KAFKA = JvmService(
    name="kafka",
    noun="broker",
    pid_file="broker.pid",
    java_hint="Kafka 4.x needs Java 17+",
    state_type=State,
    answers=lambda state: kafka_ready(state.port),
)
info = KAFKA.info


@dataclass(frozen=True)
class Layout(CacheDir):
    """Every path the manager uses, all under one cache dir."""

    SERVICE = KAFKA

    @property
    def libs(self) -> Path:
        return self.home / "libs"

    @property
    def marker(self) -> Path:
        # Inside libs/ so a libs dir shared by symlink carries its own version.
        return self.libs / ".kafka-version"

    @property
    def server_properties(self) -> Path:
        return self.home / "config" / "server.properties"

    @property
    def log4j_config(self) -> Path:
        return self.home / "config" / "log4j2.xml"

    @property
    def tools_log4j_config(self) -> Path:
        return self.home / "config" / "tools-log4j2.xml"

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def server_log(self) -> Path:
        return self.logs / "server.log"

    @property
    def stdout_log(self) -> Path:
        return self.logs / "stdout.log"

    @property
    def cluster_file(self) -> Path:
        """Present in a cluster's home: its node count."""
        return self.home / "cluster.json"

    def node(self, node_id: int) -> Layout:
        """The home of one node of a cluster; its libs/ is a link to the cluster's."""
        return Layout(self.home / f"node-{node_id}")

    @property
    def security(self) -> Path:
        """The SASL_SSL listener's throwaway CA, certificates, keys and password."""
        return self.home / "security"

    def pem(self, name: str) -> Path:
        return self.security / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.security / f"{name}.key"

    @property
    def sasl_password(self) -> Path:
        return self.security / "sasl-password"


@dataclass(frozen=True)
class Quorum:
    """Where a node stands among the controllers: one standalone node (no voters), or one of a
    static quorum of every node of a cluster."""

    node_id: int = NODE_ID
    voters: tuple[tuple[int, int], ...] = ()  # (node id, controller port) of each node

    @property
    def size(self) -> int:
        return max(len(self.voters), 1)


STANDALONE = Quorum()


def kafka_version() -> str:
    """The pom is the single source of truth; the env var is for trying another release."""
    override = os.environ.get("VOICECLONE_KAFKA_VERSION", "").strip()
    if override:
        return override
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = ET.parse(POM).getroot().find("m:properties/m:kafka.version", ns)
    if node is None or not (node.text or "").strip():
        raise ServiceError(f"no <kafka.version> property in {POM}")
    return node.text.strip()


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read: it holds a secret."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT
        handle.write(text)


# --- fetching jars -------------------------------------------------------------------------------


def jar_set(version: str) -> str:
    """What libs/ holds, as its marker records it: the Kafka version and the pom's digest, so a
    cache fetched before the pom changed (before it named kafka-tools, say) is fetched again."""
    return f"{version} pom-sha256:{hashlib.sha256(POM.read_bytes()).hexdigest()[:16]}"


def fetch(layout: Layout, version: str) -> None:
    """Copy the pom's jars (Kafka, its tools, their runtime deps) from Maven Central into libs/,
    unless already there."""
    started = time.monotonic()
    if not fetch_with_maven(
        KAFKA,
        layout.libs,
        layout.marker,
        jar_set(version),
        f"Kafka {version} jars",
        lambda staging: [
            *("-f", str(POM), f"-Dkafka.version={version}"),
            *("dependency:copy-dependencies", f"-DoutputDirectory={staging}"),
        ],
    ):
        return
    jars = list(layout.libs.glob("*.jar"))
    size_mb = sum(jar.stat().st_size for jar in jars) / 1e6
    info(f"fetched {len(jars)} jars ({size_mb:.0f} MB) in {time.monotonic() - started:.1f}s")


# --- readiness: a real Kafka request over a socket -----------------------------------------------


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = b""
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf += chunk
    return buf


def _request(sock: socket.socket, api_key: int, version: int, body: bytes) -> bytes:
    """Send one request (header v1) and return the response after its correlation id."""
    client_id = b"voiceclone-broker-py"
    header = struct.pack(">hhih", api_key, version, 1, len(client_id)) + client_id
    sock.sendall(struct.pack(">i", len(header) + len(body)) + header + body)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    return _recv_exact(sock, size)[4:]


def _metadata_version(api_versions: bytes) -> int | None:
    """Pick a non-flexible Metadata version (1..8) the broker supports, if any."""
    error_code, count = struct.unpack_from(">hi", api_versions)
    if error_code != 0:
        raise ConnectionError(f"ApiVersions error {error_code}")
    for i in range(count):
        key, low, high = struct.unpack_from(">hhh", api_versions, 6 + 6 * i)
        if key == 3 and max(low, 1) <= min(high, 8):
            return max(low, 1)
    return None


def kafka_ready(port: int, timeout: float = 2.0) -> bool:
    """True once the broker answers ApiVersions and Metadata lists at least one (unfenced) broker.

    The listener accepts TCP before request processing is enabled, so a plain connect is not
    enough; and a broker that answers but is still fenced is not in Metadata yet.
    """
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            version = _metadata_version(_request(sock, 18, 0, b""))
            if version is None:  # No Metadata version we can speak: ApiVersions has to do.
                return True
            # All topics (null array); v4+ adds allow_auto_topic_creation=false.
            body = struct.pack(">i", -1) + (b"\x00" if version >= 4 else b"")
            response = _request(sock, 3, version, body)
            offset = 4 if version >= 3 else 0  # throttle_time_ms
            (brokers,) = struct.unpack_from(">i", response, offset)
            return brokers > 0
    except (OSError, struct.error):
        return False


# --- configuration and storage -------------------------------------------------------------------


def replication(nodes: int) -> dict[str, object]:
    """Replication of every topic, the internal ones included: on every node, and a write
    (acks=all) needs all but one of them in sync. One node makes do with one replica, or the
    group, transaction and share coordinators never load; a cluster spreads the coordinators'
    partitions over its nodes."""
    min_isr = max(nodes - 1, 1)
    return {
        "default.replication.factor": nodes,
        "min.insync.replicas": min_isr,
        "offsets.topic.replication.factor": nodes,
        "offsets.topic.num.partitions": nodes,
        "transaction.state.log.replication.factor": nodes,
        "transaction.state.log.min.isr": min_isr,
        "transaction.state.log.num.partitions": nodes,
        "share.coordinator.state.topic.replication.factor": nodes,
        "share.coordinator.state.topic.min.isr": min_isr,
    }


def quorum_properties(quorum: Quorum, controller_port: int) -> dict[str, object]:
    if not quorum.voters:
        return {"controller.quorum.bootstrap.servers": f"{HOST}:{controller_port}"}
    voters = ",".join(f"{node_id}@{HOST}:{port}" for node_id, port in quorum.voters)
    return {"controller.quorum.voters": voters}


def server_properties(
    layout: Layout,
    port: int,
    controller_port: int,
    sasl_ssl_port: int | None = None,
    quorum: Quorum = STANDALONE,
) -> str:
    listeners = f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}"
    protocols = "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
    if sasl_ssl_port is not None:
        listeners += f",SASL_SSL://{HOST}:{sasl_ssl_port}"
        protocols += ",SASL_SSL:SASL_SSL"
    props: dict[str, object] = {
        "process.roles": "broker,controller",
        "node.id": quorum.node_id,
        **quorum_properties(quorum, controller_port),
        "listeners": listeners,
        "advertised.listeners": listeners,
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": protocols,
        "log.dirs": layout.data,
        **replication(quorum.size),
        # Dev/test convenience: no 3 s wait before the first rebalance.
        "group.initial.rebalance.delay.ms": 0,
        # As in the compose stack: a record sent to a misspelt topic fails, rather than
        # creating it (`voiceclone topics create` makes the product's topics).
        "auto.create.topics.enable": "false",
        "delete.topic.enable": "true",
        "num.partitions": 3,
        # After a crash the controller refuses the restarted broker until the old registration's
        # session expires, and a cluster moves a dead node's leaderships only then: 4 s here
        # instead of the default 9 s.
        "broker.session.timeout.ms": 4000,
        "broker.heartbeat.interval.ms": 1000,
        # A small machine: fewer threads than the server defaults.
        "num.network.threads": 2,
        "num.io.threads": 4,
        "num.recovery.threads.per.data.dir": 2,
        "log.retention.hours": 24,
    }
    if sasl_ssl_port is not None:
        props |= sasl_ssl_properties(layout)
    return "".join(f"{key}={value}\n" for key, value in props.items())


def java_command(
    layout: Layout, java: str, main: str, *args: str, log4j_config: Path | None = None
) -> list[str]:
    """`main` on the jars in libs/; logging as the broker's unless `log4j_config` is given."""
    jvm_opts = os.environ.get("VOICECLONE_KAFKA_JVM_OPTS", DEFAULT_JVM_OPTS).split()
    return [
        java,
        *jvm_opts,
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={log4j_config or layout.log4j_config}",
        # Kafka logs until its last shutdown step; log4j's own shutdown hook would stop logging
        # before that and complain on stdout.
        "-Dlog4j2.shutdownHookEnabled=false",
        f"-Dkafka.logs.dir={layout.logs}",
        home_flag(layout),
        "-cp",
        str(layout.libs / "*"),
        main,
        *args,
    ]


def new_cluster_id() -> str:
    # Kafka's Uuid text form; like Uuid.randomUuid, skip a leading '-' (CLIs take it for a flag).
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def prepare_storage(
    layout: Layout,
    java: str,
    previous: State | None,
    version: str,
    fresh: bool,
    scram_password: str | None = None,
) -> tuple[str, bool]:
    """Keep the data dir across restarts, also after a crash (Kafka recovers its logs) or with a
    new controller port (a sole voter updates its own endpoint); but wipe and format it when
    asked, when another Kafka version formatted it (formats are not forward-compatible), or when
    SCRAM credentials are wanted that it lacks (KRaft takes them at format time).
    Returns the cluster id and whether the storage holds the SCRAM credentials.
    """
    reusable = not fresh and storage_reusable(layout, previous, version)
    if reusable and previous is not None and (scram_password is None or previous.scram):
        return previous.cluster_id, previous.scram
    cluster_id = new_cluster_id()
    format_storage(layout, java, cluster_id, STANDALONE, scram_password)
    return cluster_id, scram_password is not None


def storage_reusable(layout: Layout, previous: State | None, version: str) -> bool:
    """Formatted by this Kafka version (formats are not forward-compatible)."""
    formatted = (layout.data / "meta.properties").is_file()
    return formatted and previous is not None and previous.version == version


def format_storage(
    layout: Layout,
    java: str,
    cluster_id: str,
    quorum: Quorum,
    scram_password: str | None = None,
) -> None:
    """Wipe the data dir and format it for `cluster_id`: a standalone node makes itself the only
    voter; a cluster's nodes take theirs from controller.quorum.voters."""
    shutil.rmtree(layout.data, ignore_errors=True)
    started = time.monotonic()
    cmd = java_command(
        layout,
        java,
        "kafka.tools.StorageTool",
        "format",
        *(() if quorum.voters else ("--standalone",)),
        "--config",
        str(layout.server_properties),
        "--cluster-id",
        cluster_id,
    )
    for mechanism in SASL_MECHANISMS[1:] if scram_password is not None else ():
        cmd += ["--add-scram", f"{mechanism}=[name={SASL_USER},password={scram_password}]"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ServiceError(f"formatting KRaft storage failed:\n{result.stdout}{result.stderr}")
    info(
        f"formatted fresh KRaft storage (cluster {cluster_id}) in {time.monotonic() - started:.1f}s"
    )


# --- the SASL_SSL listener: throwaway TLS material and credentials --------------------------------


def openssl(*args: str | Path) -> None:
    tool = require_tool("openssl", "it makes the SASL_SSL listener's throwaway certificates")
    result = subprocess.run([tool, *map(str, args)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ServiceError(f"openssl {args[0]} failed:\n{result.stderr}")


def new_key(layout: Layout, name: str) -> tuple[str | Path, ...]:
    """openssl req arguments: a new unencrypted RSA key into `<name>.key` (PKCS#8, as Kafka
    wants)."""
    return ("-newkey", "rsa:2048", "-nodes", "-keyout", layout.key(name))


def issue_certificate(layout: Layout, name: str, subject: str, extensions: str) -> None:
    """A new key `<name>.key` and its certificate `<name>.pem`, signed by the CA."""
    csr, ext = layout.security / f"{name}.csr", layout.security / f"{name}.ext"
    # The key identifiers: Python 3.13's strict verification wants them.
    ext.write_text(f"{extensions}\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    openssl("req", "-new", *new_key(layout, name), "-subj", subject, "-out", csr)
    signer = ("-CA", layout.pem("ca"), "-CAkey", layout.key("ca"))
    serial = ("-set_serial", f"0x{secrets.token_hex(8)}", "-days", str(CERT_DAYS))
    openssl("x509", "-req", "-in", csr, *signer, *serial, "-extfile", ext, "-out", layout.pem(name))
    csr.unlink()
    ext.unlink()


def make_certificates(layout: Layout) -> None:
    """A CA, a certificate for the broker's address, and one for a client."""
    ca = ("-subj", "/CN=voiceclone dev CA", "-days", str(CERT_DAYS), "-out", layout.pem("ca"))
    ca += ("-addext", "basicConstraints=critical,CA:TRUE")
    ca += ("-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-x509", "-new", *new_key(layout, "ca"), *ca)
    server = f"subjectAltName=IP:{HOST},DNS:localhost\nextendedKeyUsage=serverAuth"
    issue_certificate(layout, "broker", "/CN=localhost", server)
    issue_certificate(layout, "client", f"/CN={SASL_USER}", "extendedKeyUsage=clientAuth")


def ensure_security(layout: Layout) -> bool:
    """The listener's certificates and SASL password, made once and then kept; True when the
    password is new, so the storage must be formatted again with its SCRAM credentials."""
    layout.security.mkdir(mode=0o700, parents=True, exist_ok=True)
    names = ("ca", "broker", "client")
    if not all(layout.pem(n).is_file() and layout.key(n).is_file() for n in names):
        started = time.monotonic()
        make_certificates(layout)
        info(f"made a throwaway CA and certificates in {time.monotonic() - started:.1f}s")
    if layout.sasl_password.is_file():
        return False
    write_private(layout.sasl_password, secrets.token_hex(16) + "\n")  # hex: safe in JAAS
    return True


def sasl_password(layout: Layout) -> str:
    return layout.sasl_password.read_text().strip()


def pem_value(path: Path) -> str:
    """A PEM file as one server.properties value, continued over lines as Kafka's docs show."""
    return " \\\n".join(path.read_text().strip().splitlines())


def sasl_ssl_properties(layout: Layout) -> dict[str, object]:
    """SASL over TLS on the SASL_SSL listener; the user's PLAIN password is in its JAAS line,
    its SCRAM credentials in the metadata (written at format time)."""
    prefix = "listener.name.sasl_ssl."
    scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    plain = "org.apache.kafka.common.security.plain.PlainLoginModule required"
    return {
        f"{prefix}sasl.enabled.mechanisms": ",".join(SASL_MECHANISMS),
        f"{prefix}plain.sasl.jaas.config": f'{plain} user_{SASL_USER}="{sasl_password(layout)}";',
        f"{prefix}scram-sha-256.sasl.jaas.config": scram,
        f"{prefix}scram-sha-512.sasl.jaas.config": scram,
        # Inline PEM: a PEM keystore *file* would need an encrypted key and its password.
        f"{prefix}ssl.keystore.type": "PEM",
        f"{prefix}ssl.keystore.key": pem_value(layout.key("broker")),
        f"{prefix}ssl.keystore.certificate.chain": pem_value(layout.pem("broker")),
        f"{prefix}ssl.truststore.type": "PEM",
        f"{prefix}ssl.truststore.location": layout.pem("ca"),
        f"{prefix}ssl.client.auth": "required",
    }


# --- commands ------------------------------------------------------------------------------------


def sasl_ssl_listener(
    layout: Layout, args: argparse.Namespace, previous: State | None
) -> tuple[int | None, bool]:
    """(port, password is new) of the SASL_SSL listener when asked for one; (None, False) else."""
    if not args.sasl_ssl:
        return None, False
    port = choose_port(args.sasl_ssl_port, previous.sasl_ssl_port if previous else None, "SASL_SSL")
    return port, ensure_security(layout)


def launch(layout: Layout, args: argparse.Namespace, version: str) -> State:
    """Configure, format if needed, and daemonise a new broker; wait until it serves clients."""
    java = find_java(KAFKA)
    previous = read_state(layout)
    port = choose_port(args.port, DEFAULT_PORT, "broker")
    controller_port = choose_port(
        args.controller_port, previous.controller_port if previous else None, "controller"
    )
    sasl_ssl_port, new_password = sasl_ssl_listener(layout, args, previous)
    configure(layout, server_properties(layout, port, controller_port, sasl_ssl_port))
    scram_password = sasl_password(layout) if sasl_ssl_port is not None else None
    fresh = args.fresh or new_password
    cluster_id, scram = prepare_storage(layout, java, previous, version, fresh, scram_password)
    state = State(0, port, controller_port, version, cluster_id, sasl_ssl_port, scram)
    return await_ready(layout, *spawn(layout, java, state), args.timeout)


def configure(layout: Layout, properties: str) -> None:
    for directory in (layout.logs, layout.server_properties.parent):
        directory.mkdir(parents=True, exist_ok=True)
    layout.log4j_config.write_text(LOG4J2_XML)
    write_private(layout.server_properties, properties)  # may hold the listener's key


def spawn(layout: Layout, java: str, state: State) -> tuple[subprocess.Popen[bytes], State, int]:
    """Daemonise the configured broker: (its process, its state, where its log began)."""
    log_offset = file_size(layout.server_log)
    command = java_command(layout, java, "kafka.Kafka", str(layout.server_properties))
    proc = daemonise(layout, command, layout.stdout_log, "wb")
    state = dataclasses.replace(state, pid=proc.pid)
    write_state(layout, state)  # Before waiting, so `stop` can find a broker that hangs.
    return proc, state, log_offset


def await_ready(
    layout: Layout,
    proc: subprocess.Popen[bytes],
    state: State,
    log_offset: int,
    timeout: float,
    started: float | None = None,
) -> State:
    """Wait until the spawned broker serves clients; stop it and say why if it does not."""
    started = time.monotonic() if started is None else started
    await_answer(
        layout,
        proc,
        state,
        state.bootstrap,
        timeout - (time.monotonic() - started),
        # stdout.log: what the JVM itself said (new each start); server.log: Kafka's own log.
        [(layout.stdout_log, 0), (layout.server_log, log_offset)],
        hint=" (if its data dir is broken, `start --fresh` wipes it)",
    )
    info(
        f"broker ready in {time.monotonic() - started:.1f}s (pid {proc.pid}, "
        f"Kafka {state.version}, logs {layout.server_log})"
    )
    return state


# --- a cluster: several nodes under one home ----------------------------------------------------


def cluster_size(layout: Layout) -> int:
    """How many nodes the home was started with: 1 unless it holds a cluster."""
    try:
        return int(json.loads(layout.cluster_file.read_text())["nodes"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1


def node_homes(layout: Layout, nodes: int | None = None) -> list[Layout]:
    return [layout.node(n) for n in range(1, (nodes or cluster_size(layout)) + 1)]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: each socket stays bound until all are picked."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]


def kept_ports(node: Layout, previous: State, running: bool) -> tuple[int, int]:
    """A node keeps its ports for good: the other nodes know its controller port as a voter,
    clients its broker port."""
    for port, name in ((previous.port, "broker"), (previous.controller_port, "controller")):
        if not running and not port_is_free(port):
            hint = "`stop`, then `start --fresh` takes new ports"
            raise ServiceError(f"{node.home.name}: {name} port {port} is in use ({hint})")
    return previous.port, previous.controller_port


def link_libs(layout: Layout, node: Layout) -> None:
    node.home.mkdir(parents=True, exist_ok=True)
    if not node.libs.is_symlink():
        node.libs.symlink_to(Path("..") / layout.libs.name, target_is_directory=True)


def start_cluster(layout: Layout, args: argparse.Namespace, nodes: int) -> list[State]:
    """Start every node of the cluster that is not running (all of them, the first time), with
    one cluster id and a static quorum of all nodes; wait until each serves clients."""
    if args.sasl_ssl:
        raise ServiceError("a cluster has no SASL_SSL listener; use a single node for it")
    homes = node_homes(layout, nodes)
    running = [running_pid(node) is not None for node in homes]
    version = kafka_version()
    fetch(layout, version)
    previous = [read_state(node) for node in homes]
    reusable = all(storage_reusable(n, p, version) for n, p in zip(homes, previous, strict=True))
    fresh = args.fresh or not reusable
    if fresh and any(running):
        raise ServiceError("the cluster's data must be formatted again; run `stop` first")
    if fresh:
        picked = free_ports(2 * nodes)
        ports = [(picked[2 * i], picked[2 * i + 1]) for i in range(nodes)]
        cluster_id = new_cluster_id()
    else:
        kept = zip(homes, previous, running, strict=True)
        ports = [kept_ports(node, state, up) for node, state, up in kept if state is not None]
        cluster_id = next(state.cluster_id for state in previous if state is not None)
    voters = tuple((n, controller) for n, (_, controller) in enumerate(ports, 1))
    layout.cluster_file.write_text(json.dumps({"nodes": nodes}) + "\n")
    java = find_java(KAFKA)
    started = time.monotonic()
    spawned = []
    nodes_ports = zip(homes, running, ports, strict=True)
    for node_id, (node, up, (port, controller)) in enumerate(nodes_ports, 1):
        if up:
            continue
        quorum = Quorum(node_id, voters)
        link_libs(layout, node)
        configure(node, server_properties(node, port, controller, quorum=quorum))
        if fresh:
            format_storage(node, java, cluster_id, quorum)
        state = State(0, port, controller, version, cluster_id)
        spawned.append((node, *spawn(node, java, state)))
    for node, proc, state, log_offset in spawned:
        await_ready(node, proc, state, log_offset, args.timeout, started)
    return [read_state(node) for node in homes]  # type: ignore[misc]


def cluster_bootstrap(layout: Layout) -> str | None:
    """Every node's address, comma-separated, while any node runs; None when all are down."""
    homes = node_homes(layout)
    if not any(running_pid(node) is not None for node in homes):
        return None
    states = [read_state(node) for node in homes]
    return ",".join(state.bootstrap for state in states if state is not None)


def running_bootstrap(layout: Layout) -> str | None:
    """Where clients reach the broker (or cluster) of this home; None when it is stopped."""
    if cluster_size(layout) > 1:
        return cluster_bootstrap(layout)
    state = read_state(layout)
    if running_pid(layout) is None or state is None:
        return None
    return state.bootstrap


def cmd_fetch(layout: Layout, args: argparse.Namespace) -> int:
    with locked(layout):
        fetch(layout, kafka_version())
    info(f"jars in {layout.libs}")
    return EXIT_OK


def cmd_start(layout: Layout, args: argparse.Namespace) -> int:
    nodes = args.nodes or cluster_size(layout)
    if nodes != cluster_size(layout) and layout.cluster_file.is_file():
        hint = f"stop it and `start --fresh --nodes {nodes}`, or use another --home"
        raise ServiceError(f"{layout.home} holds a {cluster_size(layout)}-node cluster ({hint})")
    if nodes > 1:
        with locked(layout):
            start_cluster(layout, args, nodes)
        bootstrap = cluster_bootstrap(layout)
        print(bootstrap if args.quiet else f"bootstrap={bootstrap}")
        return EXIT_OK
    with locked(layout):
        state = reuse_running(layout, args.timeout)
        if state is not None and args.fresh:
            raise ServiceError("--fresh needs a stopped broker; run `stop` first")
        if state is not None and args.sasl_ssl and state.sasl_ssl_port is None:
            raise ServiceError("the running broker has no SASL_SSL listener; run `stop` first")
        if state is None:
            version = kafka_version()
            fetch(layout, version)
            state = launch(layout, args, version)
    if state.sasl_ssl_bootstrap and not args.quiet:
        print(f"sasl_ssl_bootstrap={state.sasl_ssl_bootstrap}")
    print(state.bootstrap if args.quiet else f"bootstrap={state.bootstrap}")
    return EXIT_OK


def stopped_homes(layout: Layout, node: int | None) -> list[Layout]:
    """What `stop` stops: the single broker, every node of a cluster, or the one asked for."""
    if cluster_size(layout) == 1:
        if node is not None:
            raise ServiceError(f"--node: {layout.home} holds a single broker, not a cluster")
        return [layout]
    if node is None:
        return node_homes(layout)
    if not 1 <= node <= cluster_size(layout):
        raise ServiceError(f"--node {node}: the cluster's nodes are 1 to {cluster_size(layout)}")
    return [layout.node(node)]


# How long the last node of a cluster gets to stop: its clean shutdown waits for a controller
# quorum to acknowledge it, and with the other nodes gone there is none.
LAST_NODE_GRACE_S = 3.0


def cmd_stop(layout: Layout, args: argparse.Namespace) -> int:
    with locked(layout):
        homes = stopped_homes(layout, args.node)
        running = [(home, pid) for home in homes if (pid := running_pid(home)) is not None]
        if not running:
            info("not running")
        alone = len(running) == cluster_size(layout) > 1
        for n, (home, pid) in enumerate(running, 1):
            started = time.monotonic()
            if args.kill:
                kill(pid, home)
            else:
                last = alone and n == len(running)
                terminate(pid, home, min(args.timeout, LAST_NODE_GRACE_S) if last else args.timeout)
            how = "killed" if args.kill else "stopped"
            info(f"{how} pid {pid} in {time.monotonic() - started:.1f}s")
    return EXIT_OK


def node_status(layout: Layout) -> tuple[int, str]:
    """(exit code, one line) for one broker or node."""
    pid = running_pid(layout)
    state = read_state(layout)
    if pid is None or state is None:
        return EXIT_STOPPED, "stopped"
    if not kafka_ready(state.port):
        return EXIT_FAIL, f"running pid={pid} but not answering on {state.bootstrap}"
    sasl_ssl = f" sasl_ssl_bootstrap={state.sasl_ssl_bootstrap}" if state.sasl_ssl_port else ""
    return (
        EXIT_OK,
        f"running pid={pid} bootstrap={state.bootstrap} version={state.version}{sasl_ssl}",
    )


def cmd_status(layout: Layout, args: argparse.Namespace) -> int:
    """A cluster: one line a node; exit 0 when all answer, 3 when all are stopped, else 1."""
    if cluster_size(layout) == 1:
        code, line = node_status(layout)
        print(line)
        return code
    codes = []
    for node_id, node in enumerate(node_homes(layout), 1):
        code, line = node_status(node)
        print(f"node {node_id}: {line}")
        codes.append(code)
    return codes[0] if len(set(codes)) == 1 else EXIT_FAIL


def cmd_bootstrap(layout: Layout, args: argparse.Namespace) -> int:
    bootstrap = running_bootstrap(layout)
    if bootstrap is None:
        info("not running")
        return EXIT_STOPPED
    print(bootstrap)
    return EXIT_OK


def cmd_client_env(layout: Layout, args: argparse.Namespace) -> int:
    """The worker's and CLI's settings for the SASL_SSL listener, one NAME=VALUE a line:
    `env $(python3 deploy/kafka/broker.py client-env) uv run voiceclone ...`."""
    state = read_state(layout)
    if running_pid(layout) is None or state is None or state.sasl_ssl_port is None:
        info("no broker with a SASL_SSL listener is running (`start --sasl-ssl`)")
        return EXIT_STOPPED
    settings = {
        "BOOTSTRAP_SERVERS": state.sasl_ssl_bootstrap,
        "SECURITY_PROTOCOL": "SASL_SSL",
        "SASL_MECHANISM": "SCRAM-SHA-512",
        "SASL_USERNAME": SASL_USER,
        "SASL_PASSWORD_FILE": layout.sasl_password,
        "SSL_CAFILE": layout.pem("ca"),
        "SSL_CERTFILE": layout.pem("client"),
        "SSL_KEYFILE": layout.key("client"),
    }
    for name, value in settings.items():
        print(f"VOICECLONE_KAFKA__{name}={value}")
    return EXIT_OK


def tool_command(layout: Layout, name: str, args: list[str]) -> list[str]:
    """The java command line of Kafka's tool `name`, given the running broker's address unless
    `args` name a cluster."""
    if name not in TOOLS:
        raise ServiceError(f"no tool {name!r}; the tools: {', '.join(TOOLS)}")
    if not any(arg.split("=", 1)[0] in BOOTSTRAP_FLAGS for arg in args):
        bootstrap = running_bootstrap(layout)
        if bootstrap is None:
            raise ServiceError(
                f"no broker is running from {layout.home}; start one, or pass --bootstrap-server"
            )
        args = ["--bootstrap-server", bootstrap, *args]
    with locked(layout):
        fetch(layout, kafka_version())  # a cache from before kafka-tools was in the pom lacks it
    layout.tools_log4j_config.parent.mkdir(parents=True, exist_ok=True)
    layout.tools_log4j_config.write_text(TOOLS_LOG4J2_XML)
    config = layout.tools_log4j_config
    return java_command(layout, find_java(KAFKA), TOOLS[name], *args, log4j_config=config)


def cmd_tool(layout: Layout, args: argparse.Namespace) -> int:
    """Become the tool: its stdin, output, signals and exit code are the caller's."""
    if not args.tool_args:
        raise ServiceError(f"`tool` needs a tool's name, one of: {', '.join(TOOLS)}")
    name, *tool_args = args.tool_args
    command = tool_command(layout, name, tool_args)
    sys.stderr.flush()
    os.execv(command[0], command)


COMMANDS = {
    "fetch": cmd_fetch,
    "start": cmd_start,
    "stop": cmd_stop,
    "status": cmd_status,
    "bootstrap": cmd_bootstrap,
    "client-env": cmd_client_env,
    "tool": cmd_tool,
}


def split_tool_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this script's arguments, the tool's): all after `tool` is the tool's, options included,
    so that argparse never takes (or abbreviates) one of them for its own."""
    if "tool" not in argv:
        return argv, []
    end = argv.index("tool") + 1
    return argv[:end], argv[end:]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    own, tool_args = split_tool_args(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"tool NAME [ARGS...]: NAME is one of {', '.join(TOOLS)}",
    )
    add_common_arguments(
        parser,
        COMMANDS,
        home=Path(os.environ.get("VOICECLONE_KAFKA_HOME") or DEFAULT_HOME),
        home_help="cache dir for jars, config, data, logs (env VOICECLONE_KAFKA_HOME)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=env_int("VOICECLONE_KAFKA_PORT"),
        help=f"broker port; 0 = any free port (env VOICECLONE_KAFKA_PORT; default {DEFAULT_PORT} "
        "if free, else any free port)",
    )
    parser.add_argument(
        "--controller-port",
        type=int,
        default=env_int("VOICECLONE_KAFKA_CONTROLLER_PORT"),
        help="KRaft controller port (env VOICECLONE_KAFKA_CONTROLLER_PORT; default: the last one "
        "if free, else any free port)",
    )
    parser.add_argument(
        "--sasl-ssl",
        action="store_true",
        default=os.environ.get("VOICECLONE_KAFKA_SASL_SSL", "").strip() in ("1", "true"),
        help="start: add a SASL_SSL listener (env VOICECLONE_KAFKA_SASL_SSL=1); `client-env` "
        "prints what a client needs for it",
    )
    parser.add_argument(
        "--sasl-ssl-port",
        type=int,
        default=env_int("VOICECLONE_KAFKA_SASL_SSL_PORT"),
        help="SASL_SSL listener port (env VOICECLONE_KAFKA_SASL_SSL_PORT; default: the last one "
        "if free, else any free port)",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=None,
        help="start: this many nodes, a local cluster (default: as the home was started, else 1)",
    )
    parser.add_argument(
        "--node", type=int, default=None, help="stop: only this node (1, 2, ...) of a cluster"
    )
    parser.add_argument(
        "--kill", action="store_true", help="stop: SIGKILL at once, as a crash (no clean stop)"
    )
    parser.add_argument("--fresh", action="store_true", help="start: wipe the data dir first")
    parser.add_argument(
        "--quiet", "-q", action="store_true", help="start: print only HOST:PORT, no progress"
    )
    args = parser.parse_args(own)
    args.tool_args = tool_args
    return args


def main(argv: list[str] | None = None) -> int:
    return run(Layout, COMMANDS, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
