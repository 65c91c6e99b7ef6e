"""The endpoint part's start-up (:class:`reft_kernels.vllm_plugin.endpoint.ReftEndpointPlugin.init_state`),
offline with a stand-in engine client: it publishes the configured adapter names (none configured:
an empty set, so every adapter request is refused), refuses to start when adapters are configured
on an architecture the plugin does not wrap (the base model would answer them), and publishes
nothing without an engine. ``vllm serve`` end to end: test_vllm_serve.py."""
import asyncio
from types import SimpleNamespace

import pytest

from reft_kernels.vllm_plugin import known
from reft_kernels.vllm_plugin.endpoint import ReftEndpointPlugin
from reft_kernels.vllm_plugin.model import reft_arch_classes


def _client(architecture, adapters=None):
    hf_config = SimpleNamespace(**({} if adapters is None else {known.ADAPTERS_CONFIG_KEY: adapters}))
    model_config = SimpleNamespace(hf_config=hf_config, architecture=architecture)
    return SimpleNamespace(vllm_config=SimpleNamespace(model_config=model_config))


def _start(client):
    asyncio.run(ReftEndpointPlugin().init_state(client, SimpleNamespace(), None))
    return known.known()


def test_init_state_publishes_refuses_or_skips(monkeypatch):
    monkeypatch.setattr(known, "_published", None)
    monkeypatch.setattr(known, "local_store", None)
    wrapped = sorted(reft_arch_classes())[0]
    assert _start(_client(wrapped, {"b": "/b", "a": {"path": "/a", "positions": "l1"}})) == {"a", "b"}
    assert _start(_client(wrapped)) == frozenset()
    assert _start(_client("BertForMaskedLM")) == frozenset()          # no adapters: any architecture serves
    known._published = None
    with pytest.raises(ValueError, match=r"ReFT adapters \['a'\].*'BertForMaskedLM' is not one"):
        _start(_client("BertForMaskedLM", {"a": "/a"}))
    assert known.known() is None                                        # nothing published on refusal
    with pytest.raises(ValueError, match="must map adapter names"):
        _start(_client(wrapped, ["a"]))
    assert _start(None) is None                                         # no engine: nothing to publish
