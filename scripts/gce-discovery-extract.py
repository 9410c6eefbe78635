#!/usr/bin/env python3
"""Writes the part of Google's Compute Engine v1 discovery document that
kiln's fake GCE server (tests/src/gce/) serves: the methods it answers (their
paths, HTTP verbs and parameters), the schemas of their bodies with every
schema those refer to, and the document's standard query parameters.

The discovery document ships inside PyPI's google-api-python-client; this
installs a pinned version into a throwaway virtual environment, reads it
from there, and writes tests/data/gce-compute-v1-subset.json. Descriptions
are dropped (they are most of the document's size and no check reads
them). Re-run it to move the fake to a newer published API:

    scripts/gce-discovery-extract.py [--version X.Y.Z] [--out PATH]
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

# The google-api-python-client release whose document is vendored.
PINNED_VERSION = "2.202.0"
DOCUMENT = "googleapiclient/discovery_cache/documents/compute.v1.json"

# resource -> methods the fake serves.
METHODS = {
    "instances": ["insert", "get", "delete", "list", "aggregatedList"],
    "zoneOperations": ["get", "wait"],
    "machineTypes": ["list"],
    "zones": ["list", "get"],
    "regions": ["list", "get"],
}

# Schemas the fake sends or accepts at top level; what they refer to
# (by `$ref`, at any depth) comes along.
ROOT_SCHEMAS = [
    "Instance",
    "InstanceList",
    "InstanceAggregatedList",
    "Operation",
    "MachineType",
    "MachineTypeList",
    "Zone",
    "ZoneList",
    "Region",
    "RegionList",
]

# Keys kept in a schema or parameter; the rest is prose.
DROPPED_KEYS = {"description", "enumDescriptions", "enumDeprecated"}


# Maps whose keys are names (a field may be called `description`).
NAME_MAPS = {"properties", "parameters"}


def strip(node, names=False):
    """The node without its prose, recursively; `names` when node's keys
    are field or parameter names, all of which are kept."""
    if isinstance(node, dict):
        return {
            k: strip(v, names=not names and k in NAME_MAPS)
            for k, v in node.items()
            if names or k not in DROPPED_KEYS
        }
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def refs(node, found):
    """Adds every `$ref` under node to found."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                found.add(v)
            else:
                refs(v, found)
    elif isinstance(node, list):
        for v in node:
            refs(v, found)


def load_document(version):
    with tempfile.TemporaryDirectory() as tmp:
        venv = os.path.join(tmp, "venv")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        pip = os.path.join(venv, "bin", "pip")
        # Only the package's files are needed, not its runtime dependencies.
        subprocess.run(
            [pip, "install", "--quiet", "--no-deps",
             f"google-api-python-client=={version}"],
            check=True,
        )
        paths = glob.glob(os.path.join(venv, "lib", "python*", "site-packages", DOCUMENT))
        if len(paths) != 1:
            sys.exit(f"{DOCUMENT} not found in google-api-python-client {version}")
        with open(paths[0], encoding="utf-8") as f:
            return json.load(f)


def extract(doc, version):
    methods = {}
    for resource, names in METHODS.items():
        for name in names:
            m = doc["resources"][resource]["methods"][name]
            methods[m["id"]] = strip({
                k: m[k]
                for k in ("httpMethod", "path", "parameters", "parameterOrder",
                          "request", "response")
                if k in m
            })

    wanted = set(ROOT_SCHEMAS)
    for m in methods.values():
        refs(m, wanted)
    schemas = {}
    todo = sorted(wanted)
    while todo:
        name = todo.pop()
        if name in schemas:
            continue
        schema = doc["schemas"][name]
        schemas[name] = strip(schema)
        more = set()
        refs(schema, more)
        todo.extend(sorted(more - schemas.keys()))

    return {
        "source": f"google-api-python-client {version}: {DOCUMENT}",
        "name": doc["name"],
        "version": doc["version"],
        "revision": doc["revision"],
        "servicePath": doc["servicePath"],
        "parameters": strip(doc["parameters"]),
        "methods": dict(sorted(methods.items())),
        "schemas": dict(sorted(schemas.items())),
    }


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=PINNED_VERSION)
    parser.add_argument(
        "--out",
        default=os.path.join(here, "..", "tests", "data", "gce-compute-v1-subset.json"),
    )
    args = parser.parse_args()
    subset = extract(load_document(args.version), args.version)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(subset, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"{args.out}: {len(subset['methods'])} methods, {len(subset['schemas'])} schemas")


if __name__ == "__main__":
    main()
