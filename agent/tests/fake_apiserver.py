#!/usr/bin/env python3
"""A stand-in Kubernetes API server for tests (no real one can run here).

Speaks the parts connscope uses, with real Kubernetes JSON:
  GET  /api/v1/pods?fieldSelector=spec.nodeName=N          list (PodList)
  GET  /api/v1/pods?watch=true&...                           watch (chunked)
  GET  /apis/apps/v1/namespaces/NS/replicasets/NAME          owner lookups
  GET  /apis/batch/v1/namespaces/NS/jobs/NAME
  GET  /api/v1/namespaces/NS                                 a namespace's labels (metadata)
  POST /api/v1/namespaces/NS/events                          recorded
  POST /apis/authentication.k8s.io/v1/tokenreviews           from "tokens"
  POST /apis/authorization.k8s.io/v1/subjectaccessreviews    from "grants" (non-resource URLs)
Objects come from a JSON file {"pods": [...], "namespaces": {"NS": {"labels": {...}}}, "owners": {"ReplicaSet/ns/name": {...ownerReference...}},
"tokens": {"TOKEN": {"username": ..., "uid": ..., "groups": [...]}}, "grants": {"USERNAME": ["/metrics", ...]}},
re-read on every request. Requests are logged, one JSON line each, to --log.
Usage: fake_apiserver.py --port P --state FILE --log FILE
"""
import argparse
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ARGS = None
LOCK = threading.Lock()


def state():
    with open(ARGS.state) as f:
        return json.load(f)


def log(entry):
    with LOCK, open(ARGS.log, "a") as f:
        f.write(json.dumps(entry) + "\n")


def token_review(review):
    """A TokenReview answered as the API server does: the token's user, or
    authenticated false."""
    user = state().get("tokens", {}).get(review.get("spec", {}).get("token", ""))
    status = {"authenticated": True, "user": user} if user else {"authenticated": False}
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "metadata": {"creationTimestamp": None}, "spec": review.get("spec", {}), "status": status}


def access_review(review):
    """A SubjectAccessReview of a non-resource URL: allowed when "grants"
    lists the path for the user and the verb is get."""
    spec = review.get("spec", {})
    nra = spec.get("nonResourceAttributes") or {}
    allowed = nra.get("verb") == "get" and nra.get("path") in state().get("grants", {}).get(spec.get("user"), [])
    status = {"allowed": allowed}
    if not allowed:
        status["reason"] = "no grant"
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "metadata": {"creationTimestamp": None}, "spec": spec, "status": status}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def send_json(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def not_found(self, what):
        self.send_json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                             "reason": "NotFound", "code": 404, "message": f"{what} not found"})

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        q = urllib.parse.parse_qs(url.query)
        log({"method": "GET", "path": url.path, "query": {k: v[0] for k, v in q.items()}})
        parts = url.path.strip("/").split("/")
        if url.path == "/api/v1/pods":
            node = None
            for sel in q.get("fieldSelector", [""])[0].split(","):
                if sel.startswith("spec.nodeName="):
                    node = sel.split("=", 1)[1]
            pods = [p for p in state()["pods"] if node is None or p.get("spec", {}).get("nodeName") == node]
            if q.get("watch", ["false"])[0] in ("true", "1"):
                return self.watch(int(q.get("timeoutSeconds", ["30"])[0]))
            return self.send_json(200, {"kind": "PodList", "apiVersion": "v1",
                                        "metadata": {"resourceVersion": "100"}, "items": pods})
        # /api/v1/namespaces/NS (get, metadata only or whole: the same here)
        if len(parts) == 4 and parts[:3] == ["api", "v1", "namespaces"]:
            ns = state().get("namespaces", {}).get(parts[3])
            if ns is None:
                return self.not_found(f"namespace {parts[3]}")
            return self.send_json(200, {
                "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                "metadata": {"name": parts[3], "uid": f"uid-ns-{parts[3]}", "resourceVersion": "100",
                             "labels": ns.get("labels", {})}})
        # /apis/GROUP/VERSION/namespaces/NS/RESOURCE/NAME
        if len(parts) == 7 and parts[0] == "apis" and parts[3] == "namespaces":
            ns, res, name = parts[4], parts[5], parts[6]
            kind = {"replicasets": "ReplicaSet", "jobs": "Job"}.get(res)
            owner = state().get("owners", {}).get(f"{kind}/{ns}/{name}") if kind else None
            if kind is None or owner is None:
                return self.not_found(f"{res} {name}")
            return self.send_json(200, {
                "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}",
                             "resourceVersion": "100", "ownerReferences": [owner]}})
        return self.not_found(url.path)

    def watch(self, timeout):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        deadline = time.time() + min(timeout, 60)
        try:
            while time.time() < deadline:
                ev = {"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
                                                      "metadata": {"resourceVersion": "100"}}}
                data = (json.dumps(ev) + "\n").encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                time.sleep(1)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self):
        url = urllib.parse.urlparse(self.path)
        n = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(n) or b"{}")
        log({"method": "POST", "path": url.path, "body": body})
        if url.path == "/apis/authentication.k8s.io/v1/tokenreviews":
            return self.send_json(201, token_review(body))
        if url.path == "/apis/authorization.k8s.io/v1/subjectaccessreviews":
            return self.send_json(201, access_review(body))
        body.setdefault("metadata", {}).setdefault("resourceVersion", "1")
        self.send_json(201, body)

    def do_PATCH(self):
        url = urllib.parse.urlparse(self.path)
        n = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(n) or b"{}")
        log({"method": "PATCH", "path": url.path, "body": body})
        self.send_json(200, body)


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--log", required=True)
    ARGS = p.parse_args()
    srv = ThreadingHTTPServer(("127.0.0.1", ARGS.port), Handler)
    srv.daemon_threads = True
    print(json.dumps({"ready": True, "port": ARGS.port}), flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
