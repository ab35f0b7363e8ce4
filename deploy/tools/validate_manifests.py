"""Validate Kubernetes manifests (a YAML stream, e.g. `helm template`) strictly, CRDs included.

    helm template deploy/k8s/voiceclone-worker | validate_manifests.py [--kubernetes 1.33.0]

Runs in the venv `deploy/tools/install.py validators` builds (python printed as validators=...):
- built-in kinds against Kubernetes' own JSON schemas of that release (kubernetes-validate),
  strict: a field the API does not define is an error;
- KEDA's ScaledObject and TriggerAuthentication and prometheus-operator's ServiceMonitor against
  pydantic models generated from their CRDs (cloudcoil): wrong types fail validation, and any
  field the model does not know (dropped when it is read) is reported as unknown.
A kind neither knows is an error, never a silent pass. Prints one line per document; exit 1 if
any is invalid.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pydantic
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject, TriggerAuthentication
from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

CRD_MODELS: dict[tuple[str, str], type[pydantic.BaseModel]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): ScaledObject,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): TriggerAuthentication,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ServiceMonitor,
}


def unknown_fields(given: Any, kept: Any, path: str = "") -> Iterator[str]:
    """Paths present in `given` but dropped from `kept` (the model's dump of what it read)."""
    if isinstance(given, dict):
        for key, value in given.items():
            if not isinstance(kept, dict) or key not in kept:
                yield f"{path}.{key}"
            else:
                yield from unknown_fields(value, kept[key], f"{path}.{key}")
    elif isinstance(given, list) and isinstance(kept, list):
        for index, (item, kept_item) in enumerate(zip(given, kept, strict=False)):
            yield from unknown_fields(item, kept_item, f"{path}[{index}]")


def check_custom(doc: dict[str, Any], model: type[pydantic.BaseModel]) -> list[str]:
    try:
        parsed = model.model_validate(doc)
    except pydantic.ValidationError as exc:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    kept = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return [f"{path}: unknown field" for path in unknown_fields(doc, kept)]


def check_builtin(doc: dict[str, Any], kubernetes: str) -> list[str]:
    try:
        kubernetes_validate.validate(doc, kubernetes, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(map(str, exc.path))
        return [f"{where}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {doc.get('apiVersion')} {doc.get('kind')} in {kubernetes}"]
    return []


def check(doc: dict[str, Any], kubernetes: str) -> list[str]:
    """Every problem with one manifest; empty when valid."""
    model = CRD_MODELS.get((doc.get("apiVersion", ""), doc.get("kind", "")))
    return check_custom(doc, model) if model else check_builtin(doc, kubernetes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes", default="1.33.0", help="Kubernetes release to check for")
    parser.add_argument("files", nargs="*", help="YAML files (default: standard input)")
    args = parser.parse_args(argv)
    texts = [Path(f).read_text() for f in args.files] if args.files else [sys.stdin.read()]
    docs = [doc for text in texts for doc in yaml.safe_load_all(text) if doc]
    invalid = 0
    for doc in docs:
        name = f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"
        problems = check(doc, args.kubernetes)
        invalid += bool(problems)
        print(
            f"{'INVALID' if problems else 'valid'} {name}" + "".join(f"\n  {p}" for p in problems)
        )
    print(f"{len(docs)} manifests, {invalid} invalid (Kubernetes {args.kubernetes})")
    return 1 if invalid or not docs else 0


if __name__ == "__main__":
    sys.exit(main())
