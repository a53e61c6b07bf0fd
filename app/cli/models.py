"""`models`: the models this server can serve, and fetching the pullable ones.

    kvthreads models list                         built-in models, pullable ones and their state
    kvthreads models pull smollm2-135m-instruct   download, verify (SHA-256), keep in DATA_DIR/models

KVTHREADS_MODEL then takes the registry name (`smollm2-135m-instruct`), a .gguf file, a built-in
model's name or a Hugging Face folder.
"""

from __future__ import annotations

import argparse

from app.cli.errors import CliError
from app.config import Settings
from app.engine.loading import model_registry


def list_models(settings: Settings) -> int:
    from app.engine.loading.builtin import BUILTIN_MODELS  # torch: only for this command

    rows = [(name, "built-in", "random weights, made at start") for name in BUILTIN_MODELS]
    for name, model in model_registry.REGISTRY.items():
        path = model_registry.pulled_file(name, settings.data_dir)
        state = f"pulled: {path}" if path else f"not pulled (kvthreads models pull {name})"
        rows.append((name, "gguf", f"{model.description}; {state}"))
    width = max(len(name) for name, _, _ in rows)
    for name, kind, about in rows:
        print(f"{name:<{width}}  {kind:<8}  {about}")
    return 0


def pull_model(settings: Settings, name: str) -> int:
    try:
        path = model_registry.pull(name, settings.data_dir)
    except model_registry.PullError as exc:
        raise CliError(str(exc)) from None
    print(path)
    return 0


def _handle(settings: Settings, args: argparse.Namespace) -> int:
    if args.action == "pull":
        return pull_model(settings, args.name)
    return list_models(settings)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list the models, or pull one (models pull NAME)")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="built-in and pullable models, and which are pulled")
    pull = actions.add_parser("pull", help="download a model into KVTHREADS_DATA_DIR/models")
    pull.add_argument("name", choices=sorted(model_registry.REGISTRY), metavar="NAME")
    parser.set_defaults(handler=_handle)
