"""Apply conformance/overlay.yaml to the official OSB openapi.yaml.

usage: overlay.py SPEC OVERLAY OUT CATALOG_JSON SERVICE_NAME
Fills ${ECHO_SERVICE_IDS}/${ECHO_PLAN_IDS} from the live catalog so that generated
requests use the broker's real ids (spec.md: ids "MUST be the ID of a Service
Offering from the catalog").
"""
import copy
import json
import sys

import yaml


def unescape(tok):
    return tok.replace("~1", "/").replace("~0", "~")


def nodes(doc, pointer, create):
    """Yield (parent, key) for every match of pointer; '*' matches every key."""
    toks = [unescape(t) for t in pointer.strip("/").split("/")]
    frontier = [doc]
    for tok in toks[:-1]:
        nxt = []
        for n in frontier:
            if isinstance(n, list):
                nxt.append(n[int(tok)])
                continue
            keys = list(n.keys()) if tok == "*" else [tok]
            for k in keys:
                if k not in n:
                    raise SystemExit(f"overlay: {pointer}: no {k!r}")
                nxt.append(n[k])
        frontier = nxt
    for n in frontier:
        yield n, (int(toks[-1]) if isinstance(n, list) else toks[-1])


def fill(value, subst):
    if isinstance(value, str) and value in subst:
        return subst[value]
    if isinstance(value, dict):
        return {k: fill(v, subst) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, subst) for v in value]
    return value


def main():
    spec_path, overlay_path, out_path, catalog_path, service = sys.argv[1:6]
    spec = yaml.safe_load(open(spec_path))
    overlay = yaml.safe_load(open(overlay_path))
    catalog = json.load(open(catalog_path))
    svc = next(s for s in catalog["services"] if s["name"] == service)
    subst = {
        "${ECHO_SERVICE_IDS}": [svc["id"]],
        # One plan only: a binding's or a deprovision's plan_id must be the instance's plan
        # (spec.md "Binding": "plan_id* ... MUST be the ID of the Servie Plan from the service that
        # is being used"), a cross-request rule a static schema cannot express.
        "${ECHO_PLAN_IDS}": [svc["plans"][0]["id"]],
    }
    # The strictest plan's published parameter schemas (spec.md "Schemas Object"); the other
    # echo plans accept any object, so values valid for this one are valid for all.
    for plan in svc["plans"]:
        inst = plan.get("schemas", {}).get("service_instance", {})
        for action in ("create", "update"):
            schema = dict(inst.get(action, {}).get("parameters", {"type": "object"}))
            schema.pop("$schema", None)
            subst.setdefault("${ECHO_PARAMS_%s}" % action.upper(), schema)
    for adj in overlay["adjustments"]:
        if not adj.get("why"):
            raise SystemExit(f"overlay: entry without a spec.md justification: {adj}")
        if "param" in adj:
            hit = 0
            for item in spec["paths"].values():
                for op in item.values():
                    for p in op.get("parameters", []):
                        if "$ref" in p:
                            p = spec["components"]["parameters"][p["$ref"].rsplit("/", 1)[1]]
                        if p["name"] == adj["param"]:
                            p["schema"].update(fill(copy.deepcopy(adj["merge"]), subst))
                            hit += 1
            if not hit:
                raise SystemExit(f"overlay: no parameter {adj['param']!r}")
            continue
        for parent, key in nodes(spec, adj["at"], create=True):
            if "set" in adj:
                parent[key] = fill(copy.deepcopy(adj["set"]), subst)
            else:
                parent[key].update(fill(copy.deepcopy(adj["merge"]), subst))
    yaml.safe_dump(spec, open(out_path, "w"), sort_keys=False)


if __name__ == "__main__":
    main()
