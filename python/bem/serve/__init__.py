"""bem.serve — `bem serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over bem.engine's
continuous batching, one generation thread owning the engines, Prometheus metrics,
back-pressure (429), request validation (400 naming the field), timeouts and a graceful
shutdown, and canary rollouts of the deployments in the local registry (bem.deploy) with
automatic rollback. Needs the `serve` extra (fastapi, uvicorn, prometheus_client). See
docs/serve.md."""
from bem._lazy import lazy_exports

_EXPORTS = {
    "create_app": "app", "ServeState": "app",
    "ServeMetrics": "metrics",
    "BASE_NAME": "models", "PRESETS": "models", "ServedModel": "models",
    "adapter_models": "models", "base_model": "models",
    "RequestError": "protocol", "TextDecoder": "protocol", "chat_prompt": "protocol",
    "DrainingServer": "server", "ServerThread": "server", "run_server": "server",
    "Event": "worker", "GenerationRequest": "worker", "GenerationWorker": "worker",
    "Overloaded": "worker", "ShuttingDown": "worker",
    "Rollout": "rollout", "Ticket": "rollout", "judge_live": "rollout",
}
__all__ = sorted(_EXPORTS)
# Imported on first use: the `bem` command line registers `bem serve` without loading FastAPI.
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
