"""deploy/demo.py (`make run`) makes the topics its worker and client use: brokers make none on
first use."""

import importlib.util
import sys
import uuid
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from schemas.topics import Topics

pytestmark = pytest.mark.kafka

DEMO_SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "demo.py"


def load_demo_module() -> ModuleType:
    """demo.py is a script, not a package module: load it by path for its helpers."""
    spec = importlib.util.spec_from_file_location("demo_script", DEMO_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def test_the_demo_creates_the_topics_of_its_worker(kafka_bootstrap: str) -> None:
    demo = load_demo_module()
    run = uuid.uuid4().hex[:8]
    names = {field: f"demo-{run}-{field}" for field in Topics.model_fields}
    env = demo.worker_env(None) | {"VOICECLONE_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap}
    env |= {f"VOICECLONE_TOPICS__{field.upper()}": name for field, name in names.items()}

    demo.create_topics(env)

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        assert set(names.values()) <= set(await admin.list_topics())
        await admin.delete_topics(list(names.values()))
    finally:
        await admin.close()


def test_the_demo_in_registry_mode_registers_the_schemas(schema_registry_url: str) -> None:
    """`make run REGISTRY=1`: the worker only looks schemas up, so the demo registers them."""
    demo = load_demo_module()
    run = uuid.uuid4().hex[:8]
    topic = f"demo-{run}-ready"
    env = demo.worker_env(None) | {
        "VOICECLONE_SCHEMA_REGISTRY_URL": schema_registry_url,
        "VOICECLONE_TOPICS__AUDIO_READY": topic,
    }
    demo.register_schemas(env)

    assert httpx.get(f"{schema_registry_url}/subjects/{topic}-value/versions").json() == [1]
