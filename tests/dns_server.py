"""A small authoritative DNS server on a loopback UDP port, for the discovery tests.

``python tests/dns_server.py --zone FILE`` prints ``dns listening on 127.0.0.1:PORT``.
It answers real DNS queries (dnspython parses and builds the messages) from a JSON
zone file that it reads again for every query, so a test changes the records by
rewriting the file:

    {"records": {"vllm.test.": {"A": ["127.0.0.1"]},
                 "_http._tcp.vllm.test.": {"SRV": ["0 0 8100 a.vllm.test."]}},
     "fail": false}

A name that is not in the file is NXDOMAIN; ``"fail": true`` answers SERVFAIL to
everything, as a resolver in trouble does.
"""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


def answer(query: dns.message.Message, zone: dict) -> dns.message.Message:
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    if zone.get("fail"):
        response.set_rcode(dns.rcode.SERVFAIL)
        return response
    records = {name.lower(): kinds for name, kinds in zone.get("records", {}).items()}
    for question in query.question:
        name = question.name.to_text().lower()
        kinds = records.get(name)
        if kinds is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            continue
        kind = dns.rdatatype.to_text(question.rdtype)
        values = kinds.get(kind, [])
        if values:  # a name with none of that type: NOERROR, empty (NoAnswer)
            response.answer.append(dns.rrset.from_text_list(name, 5, "IN", kind, values))
    return response


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zone", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", args.port))
    print(f"dns listening on 127.0.0.1:{sock.getsockname()[1]}", flush=True)
    while True:
        data, peer = sock.recvfrom(4096)
        try:
            query = dns.message.from_wire(data)
        except Exception:  # not DNS: nothing to answer
            continue
        zone = json.loads(Path(args.zone).read_text())
        sock.sendto(answer(query, zone).to_wire(), peer)
        for question in query.question:  # the tests count the lookups they caused
            print(f"query {question.name} {dns.rdatatype.to_text(question.rdtype)}", flush=True)


if __name__ == "__main__":
    main()
