"""An SDK generated from the served OpenAPI spec (openapi-python-client) drives a running gateway."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import msgspec

from tests.support.gateways import demo_gateway


def test_generated_python_client_fetches_and_writes(tmp_path: Path) -> None:
    server = demo_gateway(tmp_path, "--log-level", "warning")
    server.start()
    base = server.url
    try:
        spec = tmp_path / "openapi.json"
        spec.write_bytes(httpx.get(f"{base}/openapi.json", timeout=5).content)
        generator = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent))
        assert generator, "openapi-python-client is in the dev extras"
        result = subprocess.run(
            [generator, "generate", "--path", str(spec), "--output-path", str(tmp_path / "sdk")],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Warning" not in result.stdout, result.stdout  # every operation and model generated cleanly
        sys.path.insert(0, str(tmp_path / "sdk"))
        try:
            sdk = importlib.import_module("feature_gateway_client")
            fetch_features = importlib.import_module("feature_gateway_client.api.features.fetch_features")
            write_features = importlib.import_module("feature_gateway_client.api.features.write_features")
            models = importlib.import_module("feature_gateway_client.models")
            get_service = importlib.import_module("feature_gateway_client.api.registry.get_service")
            client = sdk.Client(base_url=base, raise_on_unexpected_status=True)
            with client:
                rows = models.WriteRequestRowsItem.from_dict(
                    {"store_id": "s-42", "prep_time_p50": 9.5, "open_orders": 3}
                )
                written = write_features.sync(client=client, body=models.WriteRequest(group="store_stats", rows=[rows]))
                answer = fetch_features.sync(
                    client=client,
                    body=models.FetchRequest(
                        entities=models.FetchRequestEntities.from_dict({"store_id": ["s-42", "nope"]}),
                        features=["store_stats:*"],
                    ),
                )
                by_service = fetch_features.sync(
                    client=client,
                    body=models.FetchRequest.from_dict(
                        {
                            "entities": {"consumer_id": [101]},
                            "service": "eta_model_v3",
                            "context": {"basket_value": [47.0]},
                        }
                    ),
                )
                service = get_service.sync(client=client, name="eta_model_v3")
                # The same operation asked for MessagePack (a second content type of its 200). The generated
                # functions parse every 200 as JSON, so the call goes through the client's own httpx client with
                # the generated request model, and the answer is read into the generated response model.
                asked = models.FetchRequest(
                    entities=models.FetchRequestEntities.from_dict({"store_id": ["s-42", "nope"]}),
                    features=["store_stats:*"],
                )
                binary = client.get_httpx_client().post(
                    "/v1/features/fetch", json=asked.to_dict(), headers={"Accept": "application/msgpack"}
                )
                as_msgpack = models.FetchResponse.from_dict(msgspec.msgpack.decode(binary.content))
                problem = fetch_features.sync(
                    client=client,
                    body=models.FetchRequest(
                        entities=models.FetchRequestEntities.from_dict({"store_id": ["s-42"]}),
                        features=["store_stats:nope"],
                    ),
                )
        finally:
            sys.path.remove(str(tmp_path / "sdk"))
            for name in [m for m in sys.modules if m.startswith("feature_gateway_client")]:
                del sys.modules[name]
    finally:
        server.stop()
    assert isinstance(written, models.WriteResponse)
    assert written.written == 1
    assert isinstance(answer, models.FetchResponse)
    assert answer.features == ["store_stats:prep_time_p50", "store_stats:open_orders"]
    assert answer.rows[0].values == [9.5, 3]
    assert [s.value for s in answer.rows[1].statuses] == ["MISSING", "MISSING"]
    assert binary.headers["content-type"] == "application/msgpack"
    assert as_msgpack.features == answer.features
    assert [(r.values, r.statuses) for r in as_msgpack.rows] == [(r.values, r.statuses) for r in answer.rows]
    assert isinstance(by_service, models.FetchResponse)
    assert by_service.features[-1] == "basket_ratio:basket_ratio"
    assert by_service.rows[0].values[-1] == 2.0  # 47.0 over the demo's average basket of 23.5
    assert by_service.transforms is not None
    assert isinstance(service, models.ServiceDocument)
    assert [f.name for f in service.features][0] == "consumer_live:orders_7d"
    assert isinstance(problem, models.Problem)
    assert problem.status == 422
    assert problem.field == "features[0]"
