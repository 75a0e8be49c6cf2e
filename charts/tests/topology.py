"""The topology test: Parley as the chart deploys it, every service its own process, with replicas.

It renders the chart with `helm template` (the dev values, with two gateways, two chat and two agent
replicas) and starts every Deployment's container as local processes, wired exactly as the manifests
say: the container's args, its environment (env values, `$(VAR)` references, fieldRefs, envFrom
ConfigMaps and Secrets, secretKeyRefs), its ConfigMap volumes as files, and the ports it declares. Each
replica gets a loopback address of its own (127.77.<deployment>.<replica>) standing in for its pod IP.
Service names resolve as cluster DNS resolves them: the test runs in a mount namespace of its own whose
/etc/hosts lists, for every Service, the replicas whose readiness probe passes (a headless Service
answers with every ready pod), refreshed twice a second. The migrate Job runs first, as the
pre-install hook does. PostgreSQL is a primary and a streaming replica of the test's own (made with the
machine's PostgreSQL binaries, initdb and pg_basebackup), and Redis an instance of its own, so that
the test can stop them; NATS is the machine's, under a prefix of the test's own.

Through the public API it then checks, in order:
  1. the journey: register, a conversation, a JSON send, an SSE send, the OpenAI SDK (plain and
     streamed), and a stream started on one gateway and resumed on the other with Last-Event-ID;
  2. balance: both chat replicas serve a comparable share of the calls, and a third started mid-run
     gets its share once it is ready;
  3. restarts: every agent SIGKILLed mid-reply (the reply is generated again after a `message.reset`;
     live and replayed on the other gateway, with and without Last-Event-ID, the text a client
     assembles is the stored reply); every agent SIGTERMed mid-reply (the reply finishes, no reset);
     an OpenAI stream through agents SIGTERMed (it finishes) and SIGKILLed (it ends with an error,
     having sent a beginning of the reply and nothing twice); a gateway SIGTERMed mid-stream (the
     client resumes on the other, nothing lost or repeated);
  4. degraded modes: analytics killed (sends still work, usage catches up once it is back);
     PostgreSQL's primary stopped (writes fail fast with 503 `unavailable` and Retry-After, reads
     are served by the replica, and after its restart nothing acknowledged is missing); Redis stopped
     (sends still answer, every replica stays ready, /readyz says "degraded").

    python topology.py [--parley target/debug/parley]
"""

import argparse
import base64
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import openai
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
from testkit import free_port, wait_for  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
HELM = os.path.join(ROOT, ".tools", "bin", "helm")
# Where the image keeps what the Dockerfile copies into it, here: the built web client.
IMAGE_PATHS = {"/usr/share/parley/web": os.path.join(ROOT, "web", "dist")}


def image_env():
    """The environment the image sets (the Dockerfile's ENV lines), its paths mapped to the build here:
    a container starts with it, and the manifest's env comes on top."""
    env = {}
    with open(os.path.join(ROOT, "Dockerfile")) as dockerfile:
        for line in dockerfile:
            match = re.match(r"^ENV\s+([A-Za-z_][A-Za-z0-9_]*)=(\S+)\s*$", line)
            if match:
                env[match.group(1)] = IMAGE_PATHS.get(match.group(2), match.group(2))
    return env
NATS = ("127.0.0.1", 4222)
PREFIX = "topology"
# Replicas per Deployment, beyond the dev values' one.
REPLICAS = {"gateway": 2, "chat": 2, "agent": 2}
LONG_PROMPT = " ".join(f"word{n}" for n in range(60))


def log(message):
    print(f"[topology {time.strftime('%H:%M:%S')}] {message}", flush=True)


def fail(message):
    raise AssertionError(message)


# ---- NATS: a minimal client, enough to delete the test's streams ------------------------------------

def nats_request(subject, payload=b""):
    with socket.create_connection(NATS, timeout=5) as s:
        reader = s.makefile("rb")
        reader.readline()  # INFO
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nSUB _INBOX.topology 1\r\n'
                  + f"PUB {subject} _INBOX.topology {len(payload)}\r\n".encode() + payload + b"\r\n")
        while True:
            line = reader.readline()
            if not line:
                fail(f"NATS closed the connection answering {subject}")
            if line.startswith(b"PING"):
                s.sendall(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                fail(f"NATS: {line!r}")
            elif line.startswith(b"MSG"):
                data = reader.read(int(line.split()[-1]))
                return json.loads(data)


def delete_streams():
    names = nats_request("$JS.API.STREAM.NAMES", b"{}").get("streams") or []
    for name in names:
        if name.startswith(PREFIX.upper() + "_"):
            nats_request(f"$JS.API.STREAM.DELETE.{name}")


# ---- PostgreSQL: a primary and a streaming replica of the test's own -----------------------------

class Postgres:
    def __init__(self, work):
        version = subprocess.run(["psql", "postgres://postgres@127.0.0.1:5432/postgres", "-Atc", "SHOW server_version_num"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        self.bin = f"/usr/lib/postgresql/{int(version) // 10000}/bin"
        self.primary, self.replica = os.path.join(work, "pg-primary"), os.path.join(work, "pg-replica")
        self.primary_port, self.replica_port = free_port(), free_port()

    def as_owner(self, *args, **kwargs):
        # PostgreSQL will not run as root.
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*prefix, *args], check=True, capture_output=True, text=True, **kwargs)

    def configure(self, directory, port, extra=""):
        with open(os.path.join(directory, "postgresql.conf"), "a") as f:
            f.write(f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{directory}'\n"
                    f"fsync = off\nmax_connections = 200\nshared_buffers = 32MB\n{extra}")
        with open(os.path.join(directory, "pg_hba.conf"), "w") as f:
            f.write("local all all trust\nhost all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n")

    def start(self):
        for directory in (self.primary, self.replica):
            os.makedirs(directory, mode=0o700)
            if os.geteuid() == 0:
                shutil.chown(directory, "postgres", "postgres")
        self.as_owner(f"{self.bin}/initdb", "-D", self.primary, "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.configure(self.primary, self.primary_port)
        self.start_primary()
        self.as_owner(f"{self.bin}/pg_basebackup", "-h", "127.0.0.1", "-p", str(self.primary_port), "-U", "postgres",
                      "-D", self.replica, "-R", "-X", "stream", "-c", "fast")
        self.configure(self.replica, self.replica_port, "hot_standby = on\n")
        self.as_owner(f"{self.bin}/pg_ctl", "-D", self.replica, "-l", os.path.join(self.replica, "server.log"), "-w", "start")
        subprocess.run(["psql", f"{self.url(self.primary_port)}/postgres", "-qc", "CREATE DATABASE parley"], check=True, capture_output=True)

    def start_primary(self):
        self.as_owner(f"{self.bin}/pg_ctl", "-D", self.primary, "-l", os.path.join(self.primary, "server.log"), "-w", "start")

    def stop_primary(self):
        # Fast shutdown: open sessions end with SQLSTATE 57P01 (admin shutdown), as on a failover.
        self.as_owner(f"{self.bin}/pg_ctl", "-D", self.primary, "-m", "fast", "-w", "stop")

    def stop(self):
        for directory in (self.replica, self.primary):
            if os.path.exists(os.path.join(directory, "postmaster.pid")):
                subprocess.run(["runuser", "-u", "postgres", "--", f"{self.bin}/pg_ctl", "-D", directory, "-m", "immediate", "stop"]
                               if os.geteuid() == 0 else [f"{self.bin}/pg_ctl", "-D", directory, "-m", "immediate", "stop"],
                               capture_output=True)

    @staticmethod
    def url(port):
        return f"postgres://postgres@127.0.0.1:{port}"


# ---- HTTP -------------------------------------------------------------------------------------------

def call(base, method, path, body=None, token=None, headers=None, expect=None, timeout=30, with_headers=False):
    request = urllib.request.Request(base + path, method=method)
    request.add_header("content-type", "application/json")
    if token:
        request.add_header("authorization", f"Bearer {token}")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(request, data, timeout=timeout) as response:
            status, text = response.status, response.read()
            answer_headers = response.headers
    except urllib.error.HTTPError as error:
        status, text, answer_headers = error.code, error.read(), error.headers
    if expect is not None and status != expect:
        fail(f"{method} {base}{path}: expected {expect}, got {status}: {text[:400]!r}")
    body = json.loads(text) if text else None
    return (status, body, answer_headers) if with_headers else (status, body)


class EventStream:
    """Server-sent events from one response, read as they come."""

    def __init__(self, base, method, path, token, body=None, last_event_id=None):
        host, port = base.removeprefix("http://").split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=30)
        headers = {"authorization": f"Bearer {token}", "accept": "text/event-stream",
                   "content-type": "application/json"}
        if last_event_id is not None:
            headers["last-event-id"] = str(last_event_id)
        self.connection.request(method, path, json.dumps(body) if body is not None else None, headers)
        self.response = self.connection.getresponse()
        if self.response.status != 200:
            fail(f"{method} {path}: {self.response.status} {self.response.read()[:300]!r}")

    def __iter__(self):
        event, event_id, data = None, None, []
        while True:
            try:
                line = self.response.readline()
            except (OSError, http.client.HTTPException):
                return
            if not line:
                return
            line = line.decode().rstrip("\r\n")
            if line == "":
                if data:
                    yield event or "message", event_id, json.loads("\n".join(data))
                event, event_id, data = None, None, []
            elif line.startswith(":"):
                continue
            else:
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "event":
                    event = value
                elif field == "id":
                    event_id = int(value)
                elif field == "data":
                    data.append(value)

    def close(self):
        self.connection.close()


class Assembled:
    """What a client holds of a reply: deltas appended, a reset voiding what came before."""

    def __init__(self, text=""):
        self.text, self.resets, self.last_id, self.final = text, 0, None, None

    def take(self, event, event_id, data):
        if event == "message.delta":
            self.text += data["text"]
        elif event == "message.reset":
            self.text, self.resets = "", self.resets + 1
        elif event in ("message.completed", "message.failed"):
            self.final = (event, data)
        if event_id is not None and event != "message.created":
            self.last_id = event_id
        return event in ("message.delta", "message.reset", "message.created")

    def read(self, stream, deltas=None):
        """Reads to the end of the reply (or, with `deltas`, until that many deltas were taken)."""
        seen = 0
        for event, event_id, data in stream:
            if not self.take(event, event_id, data):
                return self
            if event == "message.delta":
                seen += 1
                if deltas is not None and seen >= deltas:
                    return self
        return self


# ---- the chart, rendered and run ---------------------------------------------------------------------

class Replica:
    def __init__(self, cluster, deployment, index, ip):
        self.cluster, self.deployment, self.index, self.ip = cluster, deployment, index, ip
        self.name = f"{deployment['metadata']['name']}-{index}"
        self.component = deployment["metadata"]["labels"].get("app.kubernetes.io/component", "")
        self.container = deployment["spec"]["template"]["spec"]["containers"][0]
        self.process = None
        self.ready = False

    def port(self, name_or_number):
        if isinstance(name_or_number, int):
            return name_or_number
        for port in self.container.get("ports", []):
            if port["name"] == name_or_number:
                return port["containerPort"]
        fail(f"{self.name}: no port named {name_or_number}")

    def url(self, port_name):
        return f"http://{self.ip}:{self.port(port_name)}"

    def start(self):
        env = self.cluster.container_env(self.deployment, self.container, self.ip, self.name)
        args = [self.cluster.parley, *(arg.replace("0.0.0.0:", f"{self.ip}:") for arg in self.container.get("args", []))]
        out = open(os.path.join(self.cluster.work, f"{self.name}.log"), "ab")
        self.process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.ready = False

    def probe(self):
        probe = self.container.get("readinessProbe", {}).get("httpGet")
        if self.process is None or self.process.poll() is not None:
            return False
        if probe is None:
            return True
        try:
            url = f"http://{self.ip}:{self.port(probe['port'])}{probe['path']}"
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError, http.client.HTTPException):
            return False

    def signal(self, number):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(number)

    def wait(self, timeout):
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            fail(f"{self.name} did not exit within {timeout} s")

    def metric(self, prefix):
        """The sum of the series on the replica's /metrics whose line starts with `prefix`."""
        port = "admin" if any(p["name"] == "admin" for p in self.container.get("ports", [])) else "http"
        with urllib.request.urlopen(f"{self.url(port)}/metrics", timeout=5) as response:
            text = response.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


class Cluster:
    def __init__(self, parley, work, objects):
        self.parley, self.work, self.objects = parley, work, objects
        self.by_kind = {}
        for obj in objects:
            self.by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
        self.deployments = list(self.by_kind["Deployment"].values())
        self.replicas = []
        self.hosts = os.path.join(work, "hosts")
        with open("/etc/hosts") as f:
            self.base_hosts = f.read()
        self.stop_dns = threading.Event()
        self.lock = threading.Lock()

    # The environment of a container, as the kubelet builds it.
    def secret_value(self, name, key, optional=False):
        secret = self.by_kind.get("Secret", {}).get(name)
        if secret is None:
            if optional:
                return None
            fail(f"no Secret {name}")
        if key in (secret.get("stringData") or {}):
            return secret["stringData"][key]
        if key in (secret.get("data") or {}):
            return base64.b64decode(secret["data"][key]).decode()
        if optional:
            return None
        fail(f"Secret {name} has no key {key}")

    def container_env(self, deployment, container, ip, pod_name):
        env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **image_env()}
        mounts = self.materialise_volumes(deployment, container, pod_name)
        valid = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
        for source in container.get("envFrom") or []:
            if "configMapRef" in source:
                data = self.by_kind["ConfigMap"][source["configMapRef"]["name"]].get("data") or {}
                env.update({k: v for k, v in data.items() if valid.match(k)})
            if "secretRef" in source:
                secret = self.by_kind.get("Secret", {}).get(source["secretRef"]["name"], {})
                env.update({k: v for k, v in (secret.get("stringData") or {}).items() if valid.match(k)})
                env.update({k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items() if valid.match(k)})
        for entry in container.get("env") or []:
            name = entry["name"]
            if "value" in entry:
                env[name] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), str(entry["value"]))
                continue
            source = entry.get("valueFrom", {})
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                value = self.secret_value(ref["name"], ref["key"], ref.get("optional", False))
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                value = (self.by_kind["ConfigMap"][ref["name"]].get("data") or {}).get(ref["key"])
            elif "fieldRef" in source:
                value = {"metadata.name": pod_name, "metadata.namespace": "parley", "status.podIP": ip}[source["fieldRef"]["fieldPath"]]
            else:
                fail(f"{pod_name}: env {name} has a source this test does not know: {source}")
            if value is not None:
                env[name] = value
        for name, value in list(env.items()):
            # The pod listens on every address of its own: here, on its loopback address.
            value = value.replace("0.0.0.0:", f"{ip}:")
            # A path in a mounted volume: the same path in the volume's directory here.
            for mount_path in sorted(mounts, key=len, reverse=True):
                if value.startswith(mount_path + "/"):
                    value = mounts[mount_path] + value[len(mount_path):]
                    break
            env[name] = value
        return env

    def materialise_volumes(self, deployment, container, pod_name):
        """Writes each ConfigMap volume's files to a directory; mount path -> that directory."""
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"].get("volumes") or []}
        mounts = {}
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount["name"], {})
            local = os.path.join(self.work, "volumes", pod_name, mount["name"])
            os.makedirs(local, exist_ok=True)
            if "configMap" in volume:
                data = self.by_kind["ConfigMap"][volume["configMap"]["name"]].get("data") or {}
                items = volume["configMap"].get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    with open(os.path.join(local, item["path"]), "w") as f:
                        f.write(data[item["key"]])
            mounts[mount["mountPath"].rstrip("/")] = local
        return mounts

    # Cluster DNS: every Service name resolves to its ready replicas.
    def write_hosts(self):
        lines = [self.base_hosts.rstrip("\n"), "# Parley topology test: Services and their ready replicas"]
        with self.lock:
            replicas = list(self.replicas)
        for service in self.by_kind.get("Service", {}).values():
            selector = service["spec"].get("selector") or {}
            for replica in replicas:
                labels = replica.deployment["spec"]["template"]["metadata"]["labels"]
                if replica.ready and all(labels.get(k) == v for k, v in selector.items()):
                    lines.append(f"{replica.ip} {service['metadata']['name']}")
        text = "\n".join(lines) + "\n"
        # In place: /etc/hosts is bound to this very file.
        with open(self.hosts, "r+") as f:
            if f.read() != text:
                f.seek(0)
                f.write(text)
                f.truncate()

    def dns_loop(self):
        while not self.stop_dns.is_set():
            with self.lock:
                replicas = list(self.replicas)
            for replica in replicas:
                replica.ready = replica.probe()
            self.write_hosts()
            self.stop_dns.wait(0.5)

    def add_replica(self, component):
        deployment = next(d for d in self.deployments if d["metadata"]["labels"].get("app.kubernetes.io/component") == component)
        position = self.deployments.index(deployment) + 1
        index = sum(1 for r in self.replicas if r.deployment is deployment)
        replica = Replica(self, deployment, index, f"127.77.{position}.{index + 1}")
        replica.start()
        with self.lock:
            self.replicas.append(replica)
        return replica

    def of(self, component):
        return [r for r in self.replicas if r.component == component]

    def start(self):
        with open(self.hosts, "w") as f:
            f.write(self.base_hosts)
        subprocess.run(["mount", "--bind", self.hosts, "/etc/hosts"], check=True)
        for deployment in self.deployments:
            component = deployment["metadata"]["labels"].get("app.kubernetes.io/component")
            for _ in range(deployment["spec"].get("replicas", 1)):
                self.add_replica(component)
        threading.Thread(target=self.dns_loop, daemon=True).start()
        def all_ready():
            exited = [r.name for r in self.replicas if r.process.poll() is not None]
            if exited:
                fail(f"exited while starting: {exited}")
            return all(r.ready for r in self.replicas)

        wait_for("every replica to be ready", all_ready, timeout=120)
        log(f"{len(self.replicas)} processes ready: " + ", ".join(f"{r.name}@{r.ip}" for r in self.replicas))

    def stop(self):
        self.stop_dns.set()
        for replica in self.replicas:
            replica.signal(signal.SIGTERM)
        for replica in self.replicas:
            if replica.process is not None:
                try:
                    replica.process.wait(40)
                except subprocess.TimeoutExpired:
                    replica.process.kill()

    def logs(self):
        for replica in self.replicas:
            path = os.path.join(self.work, f"{replica.name}.log")
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    tail = f.readlines()[-15:]
                print(f"--- {replica.name} ({replica.ip}), last lines:\n" + "".join(tail), file=sys.stderr)


def render(work, redis_port, postgres):
    values = os.path.join(work, "values.yaml")
    with open(values, "w") as f:
        yaml.safe_dump({
            "database": {"url": f"{postgres.url(postgres.primary_port)}/parley",
                         "replicaUrls": [f"{postgres.url(postgres.replica_port)}/parley"]},
            "redis": {"url": f"redis://127.0.0.1:{redis_port}"},
            "nats": {"url": f"nats://{NATS[0]}:{NATS[1]}"},
            "config": {
                "natsPrefix": PREFIX,
                "adminEmails": [ADMIN_EMAIL],
                "redisPrefix": PREFIX,
                "logFormat": "json",
                # Jobs held by a dead agent come back after 3 s rather than 30.
                "toml": 'default_model = "parley-fake"\n[nats]\njob_ack_wait_secs = 3\n',
            },
            "fakeLlm": {"tokensPerSecond": 40},
            **{component: {"replicas": count} for component, count in REPLICAS.items()},
        }, f)
    rendered = subprocess.run(
        [HELM, "template", "parley", os.path.join(ROOT, "charts", "parley"), "--namespace", "parley",
         "-f", os.path.join(ROOT, "charts", "parley", "ci", "dev-values.yaml"), "-f", values],
        check=True, capture_output=True, text=True).stdout
    return [obj for obj in yaml.safe_load_all(rendered) if obj]


def run_job(cluster, name, kind="Job"):
    """Runs a Job's container to completion, as a Helm hook would (or a CronJob's, as its schedule
    would); its output."""
    job = cluster.by_kind[kind][name]
    if kind == "CronJob":
        # The Job it would create: its template's spec under the CronJob's metadata.
        job = {"metadata": job["metadata"], "spec": job["spec"]["jobTemplate"]["spec"]}
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = cluster.container_env(job, container, "127.77.0.1", name)
    result = subprocess.run([cluster.parley, *container.get("args", [])], env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        fail(f"{kind} {name} failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
    return result.stdout


# ---- the checks ---------------------------------------------------------------------------------------

ADMIN_EMAIL = "admin@topology.test"
admin_token = None


def register(base, name):
    """A new account on the enterprise tier (the free tier's 20 requests a minute would throttle the
    test), set by an admin through the admin API."""
    global admin_token
    if admin_token is None:
        _, session = call(base, "POST", "/v1/auth/register", {"email": ADMIN_EMAIL, "password": "correct horse battery"}, expect=201)
        admin_token = session["access_token"]
    email = f"{name}-{int(time.time() * 1000)}@example.com"
    _, session = call(base, "POST", "/v1/auth/register", {"email": email, "password": "correct horse battery"}, expect=201)
    token = session["access_token"]
    _, me = call(base, "GET", "/v1/me", token=token, expect=200)
    call(base, "PUT", f"/v1/admin/users/{me['id']}/tier", {"tier": "enterprise"}, admin_token, expect=200)
    return token


def conversation(base, token, title):
    _, body = call(base, "POST", "/v1/conversations", {"title": title}, token, expect=201)
    return body["id"]


def stored(base, token, message_id):
    _, message = call(base, "GET", f"/v1/messages/{message_id}", token=token, expect=200)
    return message


def journey(cluster, a, b):
    token = register(a, "journey")
    thread = conversation(a, token, "topology")
    _, exchange = call(a, "POST", f"/v1/conversations/{thread}/messages", {"content": "Hello, replicas"}, token, expect=200)
    reply = exchange["assistant_message"]
    if reply["status"] != "completed" or "Hello, replicas" not in reply["content"]:
        fail(f"JSON send: {exchange}")
    # The other gateway reads what this one wrote.
    _, listed = call(b, "GET", f"/v1/conversations/{thread}/messages", token=token, expect=200)
    if [m["role"] for m in listed["data"]] != ["user", "assistant"]:
        fail(f"thread on the other gateway: {listed}")

    stream = EventStream(b, "POST", f"/v1/conversations/{thread}/messages", token, {"content": "Stream to me"})
    assembled = Assembled().read(stream)
    if assembled.final is None or assembled.final[0] != "message.completed" or assembled.text != assembled.final[1]["content"]:
        fail(f"SSE send: text {assembled.text!r}, final {assembled.final}")

    client = openai.OpenAI(base_url=f"{a}/v1", api_key=token, max_retries=0)
    plain = client.chat.completions.create(model="parley-fake", messages=[{"role": "user", "content": "SDK says hi"}])
    streamed = client.chat.completions.create(model="parley-fake", stream=True,
                                              messages=[{"role": "user", "content": "SDK says hi"}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    if not plain.choices[0].message.content or text != plain.choices[0].message.content:
        fail(f"OpenAI SDK: plain {plain.choices[0].message.content!r}, streamed {text!r}")

    # A stream started on one gateway and resumed on the other, after its third delta.
    stream = EventStream(a, "POST", f"/v1/conversations/{thread}/messages", token, {"content": LONG_PROMPT})
    first = Assembled().read(stream, deltas=3)
    stream.close()
    _, listed = call(a, "GET", f"/v1/conversations/{thread}/messages", token=token, expect=200)
    message_id = listed["data"][-1]["id"]
    rest = Assembled(first.text)
    rest.read(EventStream(b, "GET", f"/v1/messages/{message_id}/events", token, last_event_id=first.last_id))
    if rest.text != stored(b, token, message_id)["content"]:
        fail(f"resumed on the other gateway: {rest.text!r}")
    log("journey: JSON, SSE, OpenAI SDK, and a stream resumed on the other gateway")

    # The web client and the status page, from the image, on both gateways.
    for gateway in (a, b):
        for page in ("/", "/status"):
            request = urllib.request.Request(gateway + page)
            with urllib.request.urlopen(request, timeout=10) as response:
                if response.status != 200 or not response.headers["content-type"].startswith("text/html"):
                    fail(f"{gateway}{page}: {response.status} {response.headers['content-type']}")
        wait_for(f"{gateway}'s status page to show every component operational",
                 lambda: call(gateway, "GET", "/v1/status", expect=200)[1]["status"] == "operational", timeout=30)
    log("journey: the web client and the status page on both gateways, every component operational")


def chat_calls(cluster):
    return {r.name: r.metric("parley_grpc_server_requests_total") for r in cluster.of("chat") if r.ready}


def traffic(a, b, token, thread, sends):
    for n in range(sends):
        call(a if n % 2 else b, "POST", f"/v1/conversations/{thread}/messages", {"content": f"balance {n}"}, token, expect=200)


def shares(before, after):
    served = {name: after[name] - before.get(name, 0) for name in after}
    total = sum(served.values()) or 1
    return {name: round(count / total, 3) for name, count in served.items()}, total


def spread(cluster, a, b, token, thread, sends, what, least):
    """Sends `sends` messages; every chat replica must have served at least `least` of the chat calls."""
    before = chat_calls(cluster)
    traffic(a, b, token, thread, sends)
    split, total = shares(before, chat_calls(cluster))
    log(f"balance: {total:.0f} chat calls over {what}: {split}")
    if len(split) != len(cluster.of("chat")) or min(split.values()) < least:
        fail(f"the chat replicas do not share the calls ({what}): {split}")


def balance(cluster, a, b):
    token = register(a, "balance")
    thread = conversation(a, token, "balance")
    spread(cluster, a, b, token, thread, 20, "two replicas", 0.3)

    added = cluster.add_replica("chat")
    wait_for("the third chat replica to be ready", lambda: added.ready, timeout=60)

    # Clients resolve the name again within 5 s: the new replica gets calls from then on.
    def new_replica_called():
        traffic(a, b, token, thread, 2)
        return chat_calls(cluster).get(added.name, 0) > 0

    wait_for("the third chat replica to get calls", new_replica_called, timeout=30)
    spread(cluster, a, b, token, thread, 30, "three replicas, one added mid-run", 0.15)


def start_long_reply(base, token, thread):
    stream = EventStream(base, "POST", f"/v1/conversations/{thread}/messages", token, {"content": LONG_PROMPT})
    held = Assembled().read(stream, deltas=3)
    _, listed = call(base, "GET", f"/v1/conversations/{thread}/messages", token=token, expect=200)
    return stream, held, listed["data"][-1]["id"]


def replays_match(base, token, message_id, expected):
    """The reply replayed from the start, and resumed after several of its events holding what a client
    held by then: the same text as stored every time."""
    path = f"/v1/messages/{message_id}/events"
    events = list(EventStream(base, "GET", path, token))
    whole = Assembled()
    for event in events:
        whole.take(*event)
    if whole.text != expected or whole.resets != 1:
        fail(f"replayed from the start: {whole.resets} resets, {whole.text!r} != {expected!r}")
    ids = [event_id for event, event_id, _ in events if event in ("message.delta", "message.reset")]
    reset_id = next(event_id for event, event_id, _ in events if event == "message.reset")
    for after in sorted({ids[0], ids[1], reset_id - 1, reset_id, reset_id + 1, ids[-1]}):
        held = Assembled()
        for event in events:
            if event[1] is not None and event[1] > after:
                break
            held.take(*event)
        held.read(EventStream(base, "GET", path, token, last_event_id=after))
        if held.text != expected:
            fail(f"resumed after event {after}: {held.text!r} != {expected!r}")


def restarts(cluster, a, b):
    token = register(a, "restarts")
    thread = conversation(a, token, "restarts")

    # Every agent dies mid-reply; new ones take the job over after its ack wait.
    stream, live, message_id = start_long_reply(a, token, thread)
    for agent in cluster.of("agent"):
        agent.signal(signal.SIGKILL)
    for agent in cluster.of("agent"):
        agent.wait(10)
        agent.start()
    live.read(stream)
    expected = stored(a, token, message_id)["content"]
    if live.final is None or live.final[0] != "message.completed" or live.resets != 1 or live.text != expected:
        fail(f"agents killed mid-reply: resets {live.resets}, text {live.text!r}, stored {expected!r}")
    replays_match(b, token, message_id, expected)
    log("restarts: every agent SIGKILLed mid-reply; one reset, live and replayed text equal the stored reply")

    # Every agent is stopped mid-reply: they finish it first.
    wait_for("the new agents to be ready", lambda: all(r.ready for r in cluster.of("agent")), timeout=60)
    stream, live, message_id = start_long_reply(a, token, thread)
    for agent in cluster.of("agent"):
        agent.signal(signal.SIGTERM)
    live.read(stream)
    expected = stored(a, token, message_id)["content"]
    if live.resets != 0 or live.text != expected:
        fail(f"agents stopped mid-reply: resets {live.resets}, text {live.text!r}, stored {expected!r}")
    for agent in cluster.of("agent"):
        agent.wait(30)
        agent.start()
    log("restarts: every agent SIGTERMed mid-reply; the reply finished, nothing generated twice")

    # The OpenAI-compatible stream is no job: SIGTERM lets the agents finish it (their gRPC servers
    # drain); SIGKILL ends it with an error, having repeated nothing.
    client = openai.OpenAI(base_url=f"{a}/v1", api_key=token, max_retries=0)
    messages = [{"role": "user", "content": LONG_PROMPT}]
    wait_for("the agents to be ready", lambda: all(r.ready for r in cluster.of("agent")), timeout=60)
    whole = client.chat.completions.create(model="parley-fake", messages=messages).choices[0].message.content
    for number, name in ((signal.SIGTERM, "SIGTERMed"), (signal.SIGKILL, "SIGKILLed")):
        wait_for("the agents to be ready", lambda: all(r.ready for r in cluster.of("agent")), timeout=60)
        text, error = "", None
        try:
            for n, chunk in enumerate(client.chat.completions.create(model="parley-fake", messages=messages, stream=True)):
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                if n == 3:
                    for agent in cluster.of("agent"):
                        agent.signal(number)
        except openai.APIError as raised:
            error = raised
        if number == signal.SIGTERM and (error is not None or text != whole):
            fail(f"an OpenAI stream through agents {name}: {error}, {text!r} != {whole!r}")
        if number == signal.SIGKILL and (error is None or not whole.startswith(text)):
            fail(f"an OpenAI stream through agents {name}: error {error}, {text!r} is not a beginning of {whole!r}")
        for agent in cluster.of("agent"):
            agent.wait(30)
            agent.start()
    log("restarts: an OpenAI stream finished through agents SIGTERMed, and ended with an error, repeating nothing, through agents SIGKILLed")

    # A gateway stops mid-stream: its streams end, and the client resumes on the other.
    wait_for("the new agents to be ready", lambda: all(r.ready for r in cluster.of("agent")), timeout=60)
    gateway_a = next(r for r in cluster.of("gateway") if r.url("http") == a)
    stream, live, message_id = start_long_reply(a, token, thread)
    gateway_a.signal(signal.SIGTERM)
    live.read(stream)
    if live.final is not None:
        fail("the stopping gateway finished the stream: it should have ended it for the client to resume")
    live.read(EventStream(b, "GET", f"/v1/messages/{message_id}/events", token, last_event_id=live.last_id))
    expected = stored(b, token, message_id)["content"]
    if live.text != expected:
        fail(f"resumed after a gateway stopped: {live.text!r} != {expected!r}")
    gateway_a.wait(80)
    gateway_a.start()
    wait_for("the restarted gateway to be ready", lambda: gateway_a.ready, timeout=60)
    log("restarts: a gateway SIGTERMed mid-stream; resumed on the other, nothing lost or repeated")


def degraded(cluster, a, b, redis):
    token = register(a, "degraded")
    thread = conversation(a, token, "degraded")

    redis.terminate()
    redis.wait(10)
    for n in range(3):
        call(a if n % 2 else b, "POST", f"/v1/conversations/{thread}/messages", {"content": f"no redis {n}"}, token, expect=200)
    for replica in cluster.replicas:
        if not replica.probe():
            fail(f"{replica.name} is unready without Redis, which every service degrades around")
    call(a, "GET", "/readyz", expect=200)
    for replica in cluster.of("chat") + cluster.of("quota") + cluster.of("agent"):
        _, ready = call(replica.url("admin"), "GET", "/readyz", expect=200)
        if ready.get("status") != "degraded" or ready["checks"].get("redis") == "ok":
            fail(f"{replica.name}'s /readyz without Redis: {ready}")
    def shows_cache_degraded():
        status = call(a, "GET", "/v1/status", expect=200)[1]
        states = {component["id"]: component["status"] for component in status["components"]}
        return status["status"] == "degraded" and states["cache"] == "degraded" and states["conversations"] == "operational"
    wait_for("the status page to show the cache degraded", shows_cache_degraded, timeout=30)
    log("degraded: Redis stopped; sends answered, every replica ready, /readyz and the status page say degraded")
    return token, thread


def analytics_outage(cluster, a, b):
    token = register(a, "usage")
    thread = conversation(a, token, "usage")
    (analytics,) = cluster.of("analytics")
    analytics.signal(signal.SIGKILL)
    analytics.wait(10)
    for n in range(2):
        call(a if n % 2 else b, "POST", f"/v1/conversations/{thread}/messages", {"content": f"no analytics {n}"}, token, expect=200)
    analytics.start()
    wait_for("usage to catch up once analytics is back",
             lambda: call(b, "GET", "/v1/usage", token=token)[1].get("totals", {}).get("requests") == 2, timeout=60)
    log("degraded: analytics killed; sends worked, and usage caught up when it came back")


def written_before(a):
    """A user with a thread written now, to read back later from the replica (long after the user's
    read-your-writes mark has lapsed)."""
    token = register(a, "durable")
    thread = conversation(a, token, "durable")
    for n in range(2):
        call(a, "POST", f"/v1/conversations/{thread}/messages", {"content": f"keep this {n}"}, token, expect=200)
    return token, thread


def primary_outage(cluster, a, b, postgres, token, thread):
    _, before = call(b, "GET", f"/v1/conversations/{thread}/messages", token=token, expect=200)
    postgres.stop_primary()
    for base in (a, b):
        status, problem, headers = call(base, "POST", f"/v1/conversations/{thread}/messages", {"content": "while the primary is down"},
                                        token, with_headers=True, timeout=15)
        if status != 503 or problem.get("code") != "unavailable" or not headers.get("retry-after"):
            fail(f"a write with the primary down: {status} {problem} retry-after={headers.get('retry-after')}")
    for base in (a, b):
        _, during = call(base, "GET", f"/v1/conversations/{thread}/messages", token=token, expect=200)
        if during["data"] != before["data"]:
            fail(f"reads from the replica while the primary is down: {during} != {before}")
        call(base, "GET", "/v1/conversations", token=token, expect=200)
    postgres.start_primary()
    wait_for("writes to succeed once the primary is back",
             lambda: call(a, "POST", f"/v1/conversations/{thread}/messages", {"content": "primary is back"}, token)[0] == 200,
             timeout=60, every=0.5)
    _, after = call(a, "GET", f"/v1/conversations/{thread}/messages", token=token, expect=200)
    contents = [m["content"] for m in after["data"] if m["role"] == "user"]
    if contents != ["keep this 0", "keep this 1", "primary is back"]:
        fail(f"after the primary came back: {contents}")
    log("degraded: PostgreSQL's primary stopped; writes 503 with Retry-After, reads from the replica, nothing lost")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--parley", default=os.path.join(ROOT, "target", "debug", "parley"))
    args = parser.parse_args()
    if os.environ.get("PARLEY_TOPOLOGY_NAMESPACE") != "1":
        # A private mount namespace, so that the test's /etc/hosts is seen by its processes only.
        os.environ["PARLEY_TOPOLOGY_NAMESPACE"] = "1"
        # Without root, a user namespace grants the mount (where the system allows them).
        user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
        os.execvp("unshare", ["unshare", *user, "--mount", "--propagation", "private", sys.executable, *sys.argv])

    work = tempfile.mkdtemp(prefix="parley-topology-")
    os.chmod(work, 0o755)  # PostgreSQL's files live here, owned by its own user
    redis_port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                             stdout=open(os.path.join(work, "redis.log"), "w"), stderr=subprocess.STDOUT)
    postgres = Postgres(work)
    delete_streams()
    wait_for("the test's Redis", lambda: socket.create_connection(("127.0.0.1", redis_port), timeout=1).close() or True)
    cluster = Cluster(args.parley, work, render(work, redis_port, postgres))
    ok = False
    try:
        postgres.start()
        run_job(cluster, "parley-migrate")
        cluster.start()
        a, b = (r.url("http") for r in cluster.of("gateway"))
        durable = written_before(a)
        journey(cluster, a, b)
        balance(cluster, a, b)
        restarts(cluster, a, b)
        analytics_outage(cluster, a, b)
        primary_outage(cluster, a, b, postgres, *durable)
        degraded(cluster, a, b, redis)
        # The archive and retention CronJob, run once against the data the checks above left.
        output = run_job(cluster, "parley-archive", kind="CronJob")
        for schema in ("identity:", "chat:", "quota:", "analytics:"):
            if schema not in output:
                fail(f"the archive CronJob did not apply {schema[:-1]} retention: {output}")
        log("archive CronJob: archived and applied every schema's retention")
        ok = True
    finally:
        cluster.stop()
        if not ok:
            cluster.logs()
        redis.kill()
        postgres.stop()
        delete_streams()
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work}", file=sys.stderr)
    log("passed")


if __name__ == "__main__":
    main()
