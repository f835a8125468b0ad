"""`mecbench token create`: a new bearer token for the controller and its tokens-file entry.

The token is printed once and stored nowhere; the entry holds only its SHA-256 (controller/auth.py
reads the file, docs/security.md describes it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets

from mecbench.cli.common import EXIT_OK, UsageError, out, print_json

ROLES = ("read", "run")


def token_create(args: argparse.Namespace) -> int:
    if not args.name.strip():
        raise UsageError("--name must not be empty")
    if args.role not in ROLES:
        raise UsageError(f"--role must be one of {', '.join(ROLES)}")
    token = secrets.token_urlsafe(32)
    # The same digest as controller.auth.token_digest, which the CLI does not import (it would
    # load the whole controller for one line).
    digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
    if args.json:
        print_json({"name": args.name, "role": args.role, "token": token, "sha256": digest})
        return EXIT_OK
    out(f"token for {args.name} (shown once; give it to them, e.g. as $MECBENCH_TOKEN):")
    out(f"  {token}")
    out("entry for the controller's tokens file (MECBENCH_CONTROLLER_TOKENS_FILE), under `tokens:`:")
    # JSON is also a YAML flow mapping: the line fits either kind of file, whatever the name holds.
    out(f"  - {json.dumps({'name': args.name, 'role': args.role, 'sha256': digest})}")
    return EXIT_OK
