"""A reassembled network on disk: ``structure.json`` (what it is made of) + ``model.safetensors`` (its weights).

The weights file holds only what the network uses: the stem, every block's own parameters and buffers (a block
refers to just the modules of its node range), the stitches and the head. ``structure.json`` records, for each block,
the architecture, constructor arguments, input size, cut rule, node range and chain fingerprint, plus the plans of
the stem, stitches and head and the sha256 of the weights file; :func:`load_net` rebuilds the network from these two
files alone (no zoo weights, no pickle) and refuses a pair that does not belong together. Both files are written
atomically, weights first, so an interrupted save leaves the previous network readable or an error naming the cause.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import load_into, save_checkpoint
from ..errors import CheckpointError
from ..io import sha256_of, write_text
from ..measure import count_macs, count_params
from .layers import StitchError
from .net import ReassembledNet, Structure

FORMAT = "reassembly.net/1"
STRUCTURE = "structure.json"
WEIGHTS = "model.safetensors"


def is_net_dir(path: str | Path) -> bool:
    return (Path(path) / STRUCTURE).is_file()


def save_net(net: ReassembledNet, directory: str | Path, info: dict | None = None) -> Path:
    """Write ``net`` into ``directory``; ``info`` (how it was made) goes into the structure JSON."""

    directory = Path(directory)
    weights = directory / WEIGHTS
    save_checkpoint(net, weights, metadata={"format": FORMAT})
    record = {
        "format": FORMAT,
        **net.structure.to_dict(),
        "params": count_params(net),
        "macs": count_macs(net, net.structure.input_size),
        "weights": {"file": WEIGHTS, "sha256": sha256_of(weights)},
        "info": info or {},
    }
    try:
        write_text(directory / STRUCTURE, json.dumps(record, indent=1) + "\n")
    except BaseException:  # weights without their structure are no network: leave none rather than half of one
        weights.unlink(missing_ok=True)
        raise
    return directory


def read_structure(directory: str | Path) -> dict:
    """The structure JSON of a saved network, checked for its format."""
    path = Path(directory) / STRUCTURE
    if not path.is_file():
        raise StitchError(f"{directory} is not a saved network: it has no {STRUCTURE} (make one with "
                          "`reassembly stitch --blocks ... --out DIR`)")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StitchError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise StitchError(f"{path} is not a {FORMAT} structure (format {found!r})")
    return record


def load_net(directory: str | Path) -> ReassembledNet:
    """Rebuild a saved network from its structure JSON and weights alone."""
    from .build import rebuild_block

    directory = Path(directory)
    record = read_structure(directory)
    weights = directory / record.get("weights", {}).get("file", WEIGHTS)
    if not weights.is_file():
        raise CheckpointError(f"{directory} has {STRUCTURE} but no weights file {weights.name}")
    if sha256_of(weights) != record["weights"].get("sha256"):
        raise CheckpointError(f"{weights} is not the weights file {directory / STRUCTURE} was saved with (its sha256 "
                              "differs): the two files come from different saves; save the network again")
    try:
        structure = Structure.from_dict(record)
    except (KeyError, TypeError, ValueError) as exc:
        raise StitchError(f"{directory / STRUCTURE} is malformed ({type(exc).__name__}: {exc})") from None
    blocks = [rebuild_block(ref).block for ref in structure.blocks]
    net = ReassembledNet(structure, blocks)
    load_into(net, weights, model_name=f"network {directory}")
    net.eval()
    return net
