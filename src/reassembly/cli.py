"""The ``reassembly`` command. Each verb is a thin layer over a library function of the same name."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .errors import ReassemblyError
from .text import format_table, human


class OneLineUsageError(click.UsageError):
    """A usage error shown on one line (click's own adds the usage and a 'Try --help' line)."""

    def show(self, file=None) -> None:
        where = f" (see `{self.ctx.command_path} --help`)" if self.ctx is not None else ""
        click.echo(f"Error: {self.format_message()}{where}", err=True, file=file)


class FriendlyGroup(click.Group):
    """Turn library errors into one-line messages and a non-zero exit: 1 for a failure, 2 for a usage error, 130 for
    Ctrl-C (set REASSEMBLY_DEBUG=1, or pass --debug, for tracebacks)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            if isinstance(exc, OneLineUsageError) or os.environ.get("REASSEMBLY_DEBUG"):
                raise
            raise OneLineUsageError(exc.format_message(), exc.ctx) from None
        except ReassemblyError as exc:
            if os.environ.get("REASSEMBLY_DEBUG"):
                raise
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:  # Ctrl-C: outputs are written atomically, so nothing partial is left
            if os.environ.get("REASSEMBLY_DEBUG"):
                raise
            click.echo("Error: interrupted (Ctrl-C); no partial file was written. Run the same command again: "
                       "similarity, training, NAS and `reassembly run` resume where they stopped", err=True)
            raise SystemExit(INTERRUPTED) from None
        except BrokenPipeError:  # the reader left (`reassembly info X | head`): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
            raise SystemExit(BROKEN_PIPE) from None
        except OSError as exc:  # a file or folder that cannot be read or written
            if os.environ.get("REASSEMBLY_DEBUG") or exc.strerror is None:
                raise
            names = " -> ".join(str(n) for n in (exc.filename, exc.filename2) if n is not None)
            raise click.ClickException(f"{exc.strerror}{': ' + names if names else ''}") from None


POSITIVE = click.IntRange(min=1)
INTERRUPTED = 130  # the shell's exit status for a process stopped by SIGINT
BROKEN_PIPE = 141  # ... and for one stopped by SIGPIPE


def _check_creatable(path: Path, value: str, param_type: click.ParamType, param, ctx) -> None:
    """Fail (a usage error) when ``path`` cannot be created: the nearest existing folder above it is a file, or
    cannot be written."""
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        param_type.fail(f"{value!r} cannot be created: {folder} is a file, not a folder", param, ctx)
    if not os.access(folder, os.W_OK):
        param_type.fail(f"{value!r} cannot be created: {folder} is not writable", param, ctx)


class OutputFile(click.Path):
    """A file the command will write: refused up front when it is '-', a directory, or in a folder that cannot be
    created or written, so that no work is lost at the end."""

    def __init__(self):
        super().__init__(dir_okay=False, writable=True)

    def convert(self, value, param, ctx):
        if value == "-":
            self.fail("'-' (standard output) is not supported here; give a file path", param, ctx)
        path = Path(super().convert(value, param, ctx))
        _check_creatable(path, value, self, param, ctx)
        return str(path)


class OutputDir(click.Path):
    """A folder the command will write into (an existing one is resumed or refused by the command): refused up front
    when it is a file or under one, or cannot be created or written."""

    def __init__(self):
        super().__init__(file_okay=False)

    def convert(self, value, param, ctx):
        path = Path(super().convert(value, param, ctx))
        if path.is_dir():
            if not os.access(path, os.W_OK):
                self.fail(f"{value!r} is not writable", param, ctx)
        else:
            _check_creatable(path, value, self, param, ctx)
        return str(path)


def parse_input_size(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        size = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not C,H,W (e.g. 3,32,32)") from None
    if len(size) != 3 or min(size) <= 0:
        raise click.BadParameter(f"{text!r} is not C,H,W (e.g. 3,32,32)")
    return size


def write_json(path: str, payload, announce: bool = True) -> None:
    """Write ``payload`` atomically (a failure leaves no partial file) and say so."""
    from .io import write_text

    write_text(path, json.dumps(payload, indent=2) + "\n")
    if announce:
        click.echo(f"wrote {path}")


def build_model(name: str, num_classes=None, checkpoint=None, pretrained=False):
    """The model a MODEL argument names: a saved network directory (`reassembly stitch`), a shipped zoo model (with
    its weights), an architecture, or timm:NAME."""
    from .zoo import create_model

    if Path(name).is_dir():
        if pretrained or checkpoint or num_classes:
            raise click.UsageError(f"{name} is a saved network with its own weights and classes; drop --pretrained, "
                                   "--checkpoint and --num-classes")
        if (Path(name) / "component.json").is_file() or (Path(name) / "assembly.json").is_file():
            from .lego import load_lego  # an MDA component or assembly (`reassembly disassemble|assemble`)

            return load_lego(name)
        from .stitch.io import load_net

        return load_net(name)
    if pretrained and checkpoint:
        raise click.UsageError("give either --pretrained or --checkpoint, not both")
    if not pretrained and is_shipped(name):
        if checkpoint:
            raise click.UsageError(f"{name} is a shipped model with its own weights; for an architecture with your "
                                   "checkpoint, name the architecture (see `reassembly zoo list`)")
        pretrained = True
    return create_model(name, num_classes=num_classes, checkpoint=checkpoint, pretrained=pretrained)


def is_shipped(name: str) -> bool:
    """Whether ``name`` is a shipped pretrained model rather than an architecture."""
    from .zoo import list_models
    from .zoo.pretrained import load_manifest

    return name not in list_models() and any(e.name == name for e in load_manifest())


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="reassembly")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors (as REASSEMBLY_DEBUG=1).")
def cli(debug):
    """Build new networks out of the parts of pretrained ones.

    \b
    Start here:
      reassembly run --demo                a network for CIFAR-10 classes 5-9 from blocks of the zoo
      reassembly run --print-example       the recipe behind it, to start your own
      reassembly report runs/demo          the run on one HTML page (run writes it too)
      reassembly zoo list                  pretrained models shipped with the package
      reassembly zoo list --archs          every architecture, with parameters and MACs
      reassembly info cifar_resnet20       parameters, MACs and a layer table
      reassembly eval --model cifar_resnet20 --checkpoint W.th --data cifar10
      reassembly disassemble vgg16_cifar10 --classes 0,1,2 --data cifar10 --out comp
                                           Model LEGO: the component of a model for some classes

    Datasets are looked up under --data-root, else $REASSEMBLY_DATA, else ../shared/data beside the
    checkout, else ~/.cache/reassembly/data. Set REASSEMBLY_DEBUG=1 (or pass --debug) to see tracebacks.
    """
    if debug:
        os.environ["REASSEMBLY_DEBUG"] = "1"


@cli.group()
def zoo():
    """The model zoo: architectures and the pretrained weights shipped with the package."""


@zoo.command("list")
@click.option("--archs", is_flag=True, help="List every built-in architecture (with parameters and MACs) instead.")
@click.option("--filter", "pattern", default="*", show_default=True, help="Shell-style name filter, e.g. 'cifar_*'.")
@click.option("--markdown", is_flag=True, help="Print the pretrained-model table as markdown (for results files).")
def zoo_list(archs: bool, pattern: str, markdown: bool):
    """Print the pretrained-model manifest (accuracy, parameters, MACs), or the architectures with --archs."""
    from .measure import count_macs, count_params
    from .zoo import create_model, list_models, model_info
    from .zoo.pretrained import load_manifest

    if archs:
        rows = []
        if not list_models(pattern):
            raise ReassemblyError(f"no architecture matches --filter {pattern!r} (`reassembly zoo list --archs` lists "
                                  "them all)")
        for name in list_models(pattern):
            info = model_info(name)
            model = create_model(name)
            rows.append([name, info.family, "x".join(map(str, info.input_size)), info.default_num_classes,
                         human(count_params(model)), human(count_macs(model, info.input_size))])
        click.echo(format_table(["architecture", "family", "input", "classes", "params", "MACs"], rows, "lllrrr"))
        return
    shipped = load_manifest()
    entries = [e for e in shipped if __import__("fnmatch").fnmatch(e.name, pattern)]
    if not shipped:
        click.echo("No pretrained weights are shipped yet (see `reassembly zoo list --archs` for the architectures).")
        return
    if not entries:
        raise ReassemblyError(f"no shipped model matches --filter {pattern!r}; shipped: "
                              f"{', '.join(e.name for e in shipped)}")
    headers = ["model", "architecture", "trained on", "test top-1 %", "params", "MACs", "epochs", "seed"]
    rows = [[e.name, e.architecture, e.source_data, f"{e.test_accuracy:.2f}", human(e.params), human(e.macs),
             e.epochs, e.seed] for e in entries]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        click.echo("\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]))
        return
    click.echo(format_table(headers, rows, "lllrrrrr"))


@zoo.command("train")
@click.argument("names", nargs=-1)
@click.option("--out", default="runs/zoo", show_default=True, type=OutputDir(),
              help="Run directories go here (one per model); an interrupted run resumes from its last epoch.")
@click.option("--epochs", type=POSITIVE, default=None, help="Override the recipe's epochs (recorded in the manifest).")
@click.option("--ship/--no-ship", default=True, show_default=True,
              help="Copy finished weights into the package and update the manifest and model card.")
@click.option("--threads", type=POSITIVE, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Folder holding the datasets.")
def zoo_train(names, out, epochs, ship, threads, data_root):
    """Train zoo models by recipe name (all recipes when no NAMES are given), resumably, then ship them.

    \b
    reassembly zoo recipes                   the recipe names
    reassembly zoo train resnet20_cifar5 vgg11_cifar5 --threads 1
    """
    import torch

    from .zoo.recipes import ZOO_RECIPES
    from .zoo.training import ship_zoo_model, train_zoo_model

    if threads:
        torch.set_num_threads(threads)
    for name in names:  # every name is checked before any training starts
        if name not in ZOO_RECIPES:
            from .errors import did_you_mean

            raise ReassemblyError(f"no zoo recipe named {name!r}{did_you_mean(name, ZOO_RECIPES)} (`reassembly zoo "
                                  "recipes` lists them)")
    for name in names or list(ZOO_RECIPES):
        click.echo(f"== {name}")
        run_dir = train_zoo_model(name, out, data_root=data_root, epochs=epochs, progress=sys.stderr.isatty())
        if ship:
            entry = ship_zoo_model(name, run_dir, data_root=data_root)
            click.echo(f"shipped {name}: test top-1 {entry['test_accuracy']:.2f}% ({entry['file']})")


@zoo.command("ship")
@click.argument("name")
@click.option("--out", default="runs/zoo", show_default=True, type=click.Path(file_okay=False),
              help="The folder holding the run directory NAME/.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Folder holding the datasets.")
def zoo_ship(name, out, data_root):
    """Copy the finished run NAME into the package (fp16 safetensors, manifest entry, model card)."""
    from .zoo.training import ship_zoo_model

    entry = ship_zoo_model(name, Path(out) / name, data_root=data_root)
    click.echo(f"shipped {name}: test top-1 {entry['test_accuracy']:.2f}% ({entry['file']})")


@zoo.command("recipes")
def zoo_recipes():
    """The training recipes of the zoo: architecture, data, optimiser, epochs, seed, target test top-1."""
    from .zoo.recipes import ZOO_RECIPES

    rows = [[r.name, r.architecture, r.data, r.recipe.optimizer, r.recipe.lr, r.recipe.epochs, r.seed,
             "-" if r.target_top1 is None else f"{r.target_top1:g}"] for r in ZOO_RECIPES.values()]
    click.echo(format_table(["name", "architecture", "data", "optimizer", "lr", "epochs", "seed", "target %"], rows,
                            "lllrrrrr"))


@cli.command()
@click.argument("model_name", metavar="MODEL")
@click.option("--num-classes", type=POSITIVE, default=None, help="Classifier width (default: the architecture's).")
@click.option("--input-size", default=None, help="C,H,W for counting MACs (default: the architecture's).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None, help="Weights to load first.")
@click.option("--depth", type=POSITIVE, default=None,
              help="Fold the layer table to this module depth (1 = top-level children; default: every layer).")
@click.option("--json", "json_out", default=None, type=OutputFile(), help="Also write the table as JSON to this path.")
def info(model_name, num_classes, input_size, checkpoint, depth, json_out):
    """Parameters, MACs at an input size, and a layer table for MODEL: an architecture, a shipped zoo model (with
    its weights), a saved network directory (`reassembly stitch`), or timm:NAME."""
    from .measure import count_macs, count_params, layer_table

    model = build_model(model_name, num_classes=num_classes, checkpoint=checkpoint)
    size = parse_input_size(input_size) or _default_input_size(model_name, model)
    check_input_channels(model_name, model, size[0], "--input-size " + ",".join(map(str, size)),
                         "--input-size " + ",".join(map(str, _default_input_size(model_name, model))))
    try:
        rows = layer_table(model, size, max_depth=depth)
        params, macs = count_params(model), count_macs(model, size)
    except (RuntimeError, ValueError) as exc:
        raise ReassemblyError(f"{model_name} does not run on an input of size {'x'.join(map(str, size))}: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if json_out:  # written first: printing may fail (a closed pipe) but the file is then complete
        write_json(json_out, {"model": model_name, "input_size": list(size), "params": params, "macs": macs,
                              "layers": [r.__dict__ | {"out_shape": list(r.out_shape)} for r in rows]},
                   announce=False)
    click.echo(f"{model_name}: {params:,} parameters, {macs:,} MACs ({human(macs)}) at input {'x'.join(map(str, size))}")
    click.echo(format_table(["layer", "type", "output", "params", "MACs"],
                            [[r.name, r.kind, "x".join(map(str, r.out_shape)), f"{r.params:,}", f"{r.macs:,}"]
                             for r in rows], "lllrr"))
    if json_out:
        click.echo(f"wrote {json_out}")


def _default_input_size(model_name: str, model=None) -> tuple[int, int, int]:
    from .zoo import model_info

    structure = getattr(model, "structure", None)
    if structure is not None and hasattr(structure, "input_size"):  # a saved network
        return tuple(structure.input_size)
    lego = getattr(model, "reassembly_input_size", None)
    if lego is not None:  # an MDA component or assembly
        return tuple(lego)
    if model_name.startswith("timm:"):
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return tuple(cfg.get("input_size", (3, 224, 224)))
    name = getattr(model, "reassembly_name", None) or model_name
    return model_info(name).input_size


def input_channels(model) -> int | None:
    """The channels the model's first convolution takes (None when it starts otherwise)."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.in_channels
        if isinstance(module, (nn.Linear, nn.MultiheadAttention)):
            return None
    return None


def check_input_channels(model_name: str, model, channels: int, given: str, fix: str) -> None:
    expected = input_channels(model)
    if expected is not None and channels != expected:
        raise ReassemblyError(f"{model_name} takes {expected}-channel images but {given} has {channels}: "
                              f"pass {fix}")


def check_input_size(model_name: str, model, size, fix: str | None) -> None:
    """Run one blank image of ``size`` through the model, so that a size it cannot take (a ViT's fixed position
    embedding, a flatten into a fixed linear layer) is one line naming the size, not a traceback mid-evaluation."""
    import torch

    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *size))
    except (RuntimeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ReassemblyError(f"{model_name} does not run on {'x'.join(map(str, size))} images ({reason})"
                              + (f": pass {fix}" if fix else "")) from None


@cli.command()
@click.argument("model_name", metavar="MODEL")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None, help="Weights to load first.")
@click.option("--pretrained", is_flag=True, help="Load the weights shipped with the package.")
@click.option("--num-classes", type=POSITIVE, default=None, help="Classifier width (default: the architecture's).")
@click.option("--input-size", default=None, help="C,H,W of one input (default: the architecture's).")
@click.option("--granularity", type=click.Choice(["block", "stage", "fine"]), default="block", show_default=True,
              help="block: one node per residual/transformer block; stage: per resolution stage; fine: every "
                   "legal cut.")
@click.option("--cuts", default=None,
              help="Comma-separated module names to cut after instead (works for models torch.fx cannot trace).")
@click.option("--json", "json_out", default=None, type=OutputFile(), help="Write the node chain as JSON to this path.")
def dissect(model_name, checkpoint, pretrained, num_classes, input_size, granularity, cuts, json_out):
    """Cut MODEL into a chain of atomic nodes (stem, body..., head) and check that the blocks recompose it.

    A cut is legal where one tensor carries all the state from the front of the network to the back. The
    command runs the blocks in order on a random batch and compares with the whole model before it reports.

    \b
    reassembly dissect cifar_resnet20
    reassembly dissect mobilenext_100 --granularity stage --json mobilenext.json
    reassembly dissect resnet20_cifar5 --cuts layer1,layer2,layer3
    reassembly dissect runs/net                  a saved network (reassembly stitch)

    MODEL is an architecture, a shipped zoo model (with its weights), a saved network directory, or timm:NAME.
    """
    import torch

    from .graph import dissect as dissect_model

    model = build_model(model_name, num_classes=num_classes, checkpoint=checkpoint, pretrained=pretrained)
    size = parse_input_size(input_size) or _default_input_size(model_name, model)
    check_input_channels(model_name, model, size[0], "--input-size " + ",".join(map(str, size)),
                         "--input-size " + ",".join(map(str, _default_input_size(model_name, model))))
    cut_names = None
    if cuts is not None:
        cut_names = [c.strip() for c in cuts.split(",") if c.strip()]
        if not cut_names:
            raise click.BadParameter(f"{cuts!r} names no module; give module names in the order they run, e.g. "
                                     "layer1,layer2", param_hint="'--cuts'")
    chain = dissect_model(model, size, granularity=granularity, cuts=cut_names, name=model_name)
    example = torch.randn(2, *size, generator=torch.Generator().manual_seed(1))
    error = chain.verify(example)
    if json_out:  # written before printing, so that a failed print loses nothing
        write_json(json_out, chain.to_dict(), announce=False)
    click.echo(chain.summary())
    opaque = f"; kept whole (untraceable): {', '.join(chain.opaque)}" if chain.opaque else ""
    click.echo(f"{len(chain)} nodes; blocks recompose the model (relative error {error:.1e}){opaque}")
    if json_out:
        click.echo(f"wrote {json_out}")


@cli.command("eval")
@click.option("--model", "model_name", required=True,
              help="A shipped zoo model (scored with its weights), an architecture with --checkpoint, timm:NAME, or a "
                   "saved network directory (reassembly stitch).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Weights: .safetensors, or a torch file readable with weights_only=True.")
@click.option("--pretrained", is_flag=True, help="Load the weights shipped with the package.")
@click.option("--random-weights", is_flag=True,
              help="Score an architecture with its random initialisation on purpose (a chance-level baseline).")
@click.option("--data", "data_spec", required=True, help="Dataset, e.g. cifar10, 'cifar10[0:5]', fashion_mnist.")
@click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True)
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Folder holding the datasets.")
@click.option("--num-classes", type=POSITIVE, default=None, help="Classifier width (default: the dataset's classes).")
@click.option("--image-size", type=POSITIVE, default=None, help="Resize images to this square size (e.g. 32).")
@click.option("--channels", type=POSITIVE, default=None, help="Replicate/average image channels to this count.")
@click.option("--batch-size", type=POSITIVE, default=256, show_default=True)
@click.option("--limit", type=POSITIVE, default=None,
              help="Evaluate a seeded, class-balanced sample of N images of the split (see --seed).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --limit sample.")
@click.option("--json", "json_out", default=None, type=OutputFile(), help="Write the result as JSON to this path.")
def eval_cmd(model_name, checkpoint, pretrained, random_weights, data_spec, split, data_root, num_classes, image_size,
             channels, batch_size, limit, seed, json_out):
    """Top-1 (and top-5) accuracy of a model on a dataset split.

    Launched on several processes (`accelerate launch`, `torchrun`), each evaluates a part of the split; the main
    process reports the whole split's result.
    """
    from .checkpoint import ClassCountError, load_into
    from .data import balanced_sample, load_dataset, normalization_of
    from .train import evaluate
    from .train.processes import join_processes

    if pretrained and checkpoint:
        raise click.UsageError("give either --pretrained or --checkpoint, not both")
    network = None
    shipped = not Path(model_name).is_dir() and (pretrained or is_shipped(model_name))
    if not Path(model_name).is_dir() and not shipped and not model_name.startswith("timm:"):
        from .zoo import model_info

        model_info(model_name)  # an unknown name is said (with the closest names) before asking for its weights
    if Path(model_name).is_dir():  # a saved network (reassembly stitch / train): it holds its own weights
        if pretrained or checkpoint or random_weights:
            raise click.UsageError(f"{model_name} is a saved network with its own weights; drop --pretrained, "
                                   "--checkpoint and --random-weights")
        network = build_model(model_name)
        if hasattr(network, "reassembly_input_size"):  # an MDA component or assembly: logits = its classes, in order
            from .data import DatasetSpec

            wanted = network.reassembly_classes
            spec = DatasetSpec.parse(data_spec)
            if wanted is None:
                raise click.UsageError(f"{model_name} joins classes of several datasets "
                                       f"({', '.join(network.reassembly_assembly['classes'])}); no one dataset spec "
                                       "holds them (evaluate it from Python)")
            if spec.classes is None or list(spec.classes) != wanted:
                kind = "an assembly" if hasattr(network, "reassembly_assembly") else "a component"
                raise click.UsageError(
                    f"{model_name} is {kind} for classes {wanted} (its logits in that order): evaluate it on "
                    f"'{spec.name}[{','.join(str(c) for c in wanted)}]'")
            size = network.reassembly_input_size
        else:
            size = network.structure.input_size
        image_size, channels = image_size or size[1], channels or size[0]
    elif shipped:  # read the images the way the shipped model was trained on them unless told otherwise
        from .zoo.pretrained import manifest_entry

        if checkpoint or random_weights:
            raise click.UsageError(f"{model_name} is a shipped model with its own weights; drop --checkpoint and "
                                   "--random-weights (name its architecture to score other weights)")
        entry = manifest_entry(model_name)
        image_size, channels = image_size or entry.image_size, channels or entry.channels
    elif checkpoint is None and not random_weights:
        raise click.UsageError(f"{model_name} has no weights to score: give --checkpoint FILE, name a shipped model "
                               "(`reassembly zoo list`), or pass --random-weights to score a random initialisation "
                               "on purpose")
    elif checkpoint is not None and random_weights:
        raise click.UsageError("give either --checkpoint or --random-weights, not both")
    dataset = load_dataset(data_spec, split, root=data_root, image_size=image_size, channels=channels)
    whole = len(dataset)
    if limit is not None:
        dataset = balanced_sample(dataset, limit, seed=seed)
    classes = num_classes or dataset.num_classes
    metadata = {}
    if network is not None:
        model = network
    elif shipped:
        model = build_model(model_name, pretrained=True)
        metadata = getattr(model, "reassembly_metadata", {})
    else:
        model = build_model(model_name, num_classes=classes)
        if checkpoint:
            try:
                metadata = load_into(model, checkpoint, model_name=model_name)
            except ClassCountError as exc:
                if num_classes is not None:
                    raise
                raise ReassemblyError(
                    f"{checkpoint} was trained for {exc.checkpoint_classes} classes but {dataset.name} has "
                    f"{dataset.num_classes}: evaluate it on data with {exc.checkpoint_classes} classes (e.g. the "
                    "dataset or class subset it was trained on)") from None
    size = _default_input_size(model_name, model) if not model_name.startswith("timm:") else None
    fix = f"--channels {size[0]} --image-size {size[1]}" if size else f"--channels {input_channels(model)}"
    check_input_channels(model_name, model, dataset.image_size[0], f"{dataset.name}", fix)
    check_input_size(model_name, model, dataset.image_size, f"--image-size {size[1]} (its own)" if size else None)
    mean, std = normalization_of(model, metadata)
    processes = join_processes()
    result = evaluate(model, dataset, mean, std, batch_size=batch_size, device=processes.device,
                      progress=sys.stderr.isatty())
    if not processes.is_main_process:
        return
    sample = None
    if limit is not None:
        sample = {"images": len(dataset), "of": whole, "seed": seed, "class_balanced": True}
    if json_out:  # written before printing: a failed print must not lose the result
        write_json(json_out, {"model": model_name, "checkpoint": checkpoint, "data": dataset.name, "split": split,
                              "sample": sample, **result.as_dict()}, announce=False)
    top5 = f", top-5 {result.top5:.2f}%" if result.top5 is not None else ""
    drawn = (f": a class-balanced sample (seed {seed}) of the split's {whole:,}" if sample is not None else "")
    click.echo(f"{model_name} on {dataset.name} {split}: top-1 {result.top1:.2f}%{top5} "
               f"({result.images} images{drawn}, mean loss {result.loss:.4f})")
    if json_out:
        click.echo(f"wrote {json_out}")


@cli.command()
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("dst", type=OutputFile())
@click.option("--trust-pickle", is_flag=True, required=True,
              help="Required: confirm that SRC comes from a source you trust (reading it runs its pickled code).")
def convert(src, dst, trust_pickle):
    """Re-save a pickled torch checkpoint SRC as safetensors DST (reading SRC unpickles it: trusted files only)."""
    from .checkpoint import convert_trusted_pickle

    click.echo(f"wrote {convert_trusted_pickle(src, dst)}")


@cli.command()
@click.option("--zoo", "zoo_spec", required=True,
              help="Comma-separated shipped model names, or a group: split-cifar (the Split-CIFAR zoo).")
@click.option("--data", "data_spec", required=True, help="Probe images, e.g. 'cifar10[0:5]' (labels are not used).")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--probe-size", type=POSITIVE, default=2000, show_default=True,
              help="Images drawn at random (seeded) from the split; the whole split if it has fewer.")
@click.option("--out", "out_dir", required=True, type=OutputDir(),
              help="Output directory (similarity.json, cka/*.npz, heatmaps/*.png); an unfinished run there resumes.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the probe-image draw.")
@click.option("--batch-size", type=POSITIVE, default=250, show_default=True)
@click.option("--estimator", type=click.Choice(["minibatch", "exact"]), default="minibatch", show_default=True,
              help="minibatch: unbiased HSIC averaged over batches (Nguyen et al. 2021), cheap whatever the feature "
                   "widths; exact: the full-batch CKA from streamed sufficient statistics (costs D_a x D_b per image "
                   "and model pair).")
@click.option("--debiased/--biased", default=True, show_default=True,
              help="Which CKA the input/output matrices hold (both kinds are always stored in the pair files).")
@click.option("--token-pool", type=click.Choice(["mean", "cls"]), default="mean", show_default=True,
              help="How token features become one vector: mean over all tokens (as DeRy), or the class token.")
@click.option("--image-size", type=POSITIVE, default=None, help="Resize probe images to this square size.")
@click.option("--heatmaps/--no-heatmaps", default=True, show_default=True, help="Write a PNG per model pair.")
@click.option("--checkpoint-seconds", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Save the accumulated statistics at most this often (0: after every batch), so that a killed run "
                   "loses at most this much work; Ctrl-C saves them at once.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Folder holding the datasets.")
def similarity(zoo_spec, data_spec, split, probe_size, out_dir, seed, batch_size, estimator, debiased, token_pool,
               image_size, heatmaps, checkpoint_seconds, data_root):
    """DeRy stage 1: CKA between the node inputs and outputs of every pair of zoo models, on probe images.

    Each model is dissected into its node chain; the probe images go through every model once, and the pooled
    features at every node boundary are streamed into CKA accumulators (memory does not grow with the probe set).
    Launch with `accelerate launch` or `torchrun` to split the probe set over processes.

    \b
    reassembly similarity --zoo split-cifar --data 'cifar10[0:5]' --probe-size 2000 --out runs/sim
    reassembly partition runs/sim --k 4
    """
    from .similarity import similarity_stage

    run = similarity_stage(zoo_spec, data_spec, out_dir, split=split, probe_size=probe_size, seed=seed,
                           image_size=image_size, data_root=data_root, batch_size=batch_size, estimator=estimator,
                           token_pool=token_pool, debiased=debiased, heatmaps=heatmaps, progress=sys.stderr.isatty(),
                           checkpoint_seconds=checkpoint_seconds)
    if run is None:  # a non-zero rank of a sharded run
        return
    chains = ", ".join(f"{m['name']} ({len(m['chain']['nodes'])} nodes)" for m in run.index["models"])
    click.echo(f"CKA over {run.index['samples']} probe images of {run.index['settings']['data']} {split} for {chains}")
    degenerate = {m["name"]: m["degenerate_points"] for m in run.index["models"] if m["degenerate_points"]}
    if degenerate:
        click.echo(f"constant features (CKA reported as 0) at points: {degenerate}")
    click.echo(f"wrote {Path(out_dir) / 'similarity.json'} and {len(run.index['pairs'])} pair files "
               f"in {run.index['seconds']:.1f} s")


@cli.command("partition")
@click.argument("similarity_dir", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--k", type=POSITIVE, default=4, show_default=True, help="Blocks per model = number of equivalence sets.")
@click.option("--eps", type=float, default=0.2, show_default=True,
              help="Size slack: a block holds at most (1 + eps) / K of its model (see --size).")
@click.option("--size", type=click.Choice(["nodes", "params"]), default="nodes", show_default=True,
              help="Measure the size cap in nodes (official code) or parameters (paper).")
@click.option("--general", is_flag=True,
              help="General clustering: sets are found by similarity, not fixed to the k-th block of each model.")
@click.option("--similarity", "block_similarity", type=click.Choice(["io", "first_last"]), default="io",
              show_default=True, help="io: CKA at block input + output (paper); first_last: the official code's "
                                      "first-node-output stand-in for the input.")
@click.option("--debiased/--biased", default=True, show_default=True,
              help="Which CKA to read (the similarity run stores both kinds).")
@click.option("--restarts", type=POSITIVE, default=50, show_default=True, help="Random restarts.")
@click.option("--iterations", type=POSITIVE, default=50, show_default=True, help="Iterations per restart at most.")
@click.option("--random", "random_cuts", is_flag=True,
              help="The random-partition baseline: one uniformly drawn feasible partition (--seed), block k of "
                   "every model in set k, no similarity-driven refinement (its score is still reported).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", default=None, type=OutputFile(),
              help="Where to write the partition (default DIR/partition.json; the diagram goes beside it as .png).")
def partition_cmd(similarity_dir, k, eps, size, general, block_similarity, debiased, restarts, iterations, random_cuts,
                  seed, out):
    """DeRy stage 2: cut every model of a similarity run into K blocks forming K equivalence sets.

    Reads DIR/similarity.json (from `reassembly similarity`) and writes partition.json and partition.png:
    every model's blocks (node range, parameters, MACs, shapes) and the sets of interchangeable blocks.

    \b
    reassembly partition runs/sim --k 4 --eps 0.2
    reassembly partition runs/sim --k 3 --size params --out runs/sim/partition-k3.json
    reassembly partition runs/sim --k 4 --random --seed 1 --out runs/sim/partition-random.json
    """
    from .partition.stage import partition_zoo

    if random_cuts:
        if general:
            raise click.UsageError("--random draws stage-aligned sets; drop --general")
        restarts, iterations = 1, 0
    record = partition_zoo(similarity_dir, k, eps, out=out, debiased=debiased, size=size, stage_aligned=not general,
                           similarity=block_similarity, restarts=restarts, iterations=iterations, seed=seed,
                           progress=sys.stderr.isatty())
    rows = [[model["name"]] + [f"{b['start']}-{b['stop']} ({human(b['params'])})" for b in model["blocks"]]
            for model in record["models"]]
    click.echo(format_table(["model"] + [f"block {i}" for i in range(k)], rows, "l" * (k + 1)))
    if random_cuts:
        click.echo(f"score {record['score']:.3f}; one random partition (seed {seed}), not refined")
    else:
        click.echo(f"score {record['score']:.3f}; best of {restarts} restarts (restart {record['restarts']['best']})")
    path = Path(out) if out else Path(similarity_dir) / "partition.json"
    click.echo(f"wrote {path} and {path.with_suffix('.png')}")


@cli.command("stitch")
@click.option("--blocks", default=None,
              help="Blocks in order, NAME:START-STOP each (nodes START..STOP-1 of a shipped model's chain, as in "
                   "partition.json), comma-separated.")
@click.option("--choice", type=click.Path(dir_okay=False), default=None,
              help="Take the blocks of the chosen network of a search (search.json from `reassembly search`).")
@click.option("--data", "data_spec", required=True, help="Target task, e.g. 'cifar10[5:10]': sets the head's classes "
                                                         "and supplies the least-squares probe images.")
@click.option("--out", "out_dir", required=True, type=OutputDir(),
              help="Directory for structure.json + model.safetensors.")
@click.option("--init", type=click.Choice(["least-squares", "default"]), default="least-squares", show_default=True,
              help="least-squares: fit the stem, stitches and head in closed form on probe images; default: "
                   "PyTorch's initialisation (the DeRy paper's).")
@click.option("--probe-size", type=POSITIVE, default=1000, show_default=True,
              help="Training images of --data used by the least-squares fit.")
@click.option("--max-per-class", type=POSITIVE, default=None,
              help="Draw probe images only from this many training images per class (the subset `reassembly "
                   "train --max-per-class` trains on).")
@click.option("--recalibrate-norms/--no-recalibrate-norms", default=None,
              help="With least-squares (default on): re-estimate each pretrained block's batch-norm statistics on the "
                   "probe before fitting what follows it, so the fit matches the batch statistics training "
                   "normalises by (results/split-cifar-table-1.5M, results/init-study).")
@click.option("--head", type=click.Choice(["fit", "zero"]), default="fit", show_default=True,
              help="With least-squares: fit: a ridge classifier, its penalty and temperature chosen on held-out "
                   "probe images; zero: a zeroed head (start loss log C).")
@click.option("--stem", type=click.Choice(["new", "none"]), default="new", show_default=True,
              help="new: a fresh conv stem makes the first block's input; none: the first block starts at node 0.")
@click.option("--token-pool", type=click.Choice(["mean", "cls"]), default="mean", show_default=True,
              help="How the head pools a token output: mean of the patch tokens, or the class token.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the probe draw and default init.")
@click.option("--overwrite", is_flag=True, help="Replace a network already saved in --out.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Folder holding the datasets.")
def stitch_cmd(blocks, choice, data_spec, out_dir, init, probe_size, max_per_class, recalibrate_norms, head, stem,
               token_pool, seed, overwrite, data_root):
    """DeRy stage 4: stitch blocks of different pretrained models into one network.

    Between blocks of different models goes a stitch: BatchNorm + conv (kernel = stride, the stride chosen from
    the ratio of map sizes) + LeakyReLU between feature maps, LayerNorm + Linear + LeakyReLU between tokens, and
    layout adapters between maps and tokens. A fresh stem and a head for the classes of --data complete it.
    The network is rebuilt from OUT alone (no zoo weights needed): evaluate it with
    `reassembly eval --model OUT` and train it with `reassembly train OUT`.

    \b
    reassembly stitch --blocks 'resnet20_cifar5:1-4,mobilenext_cifar5:3-9,vit_cifar5:4-7' \\
        --data 'cifar10[5:10]' --out runs/net
    reassembly stitch --choice runs/search.json --data 'cifar10[5:10]' --out runs/net
    """
    from .stitch.stage import stitch_stage

    if (blocks is None) == (choice is None):
        raise click.UsageError("give the blocks with either --blocks or --choice SEARCH.json")
    if choice is not None:
        blocks = chosen_blocks(choice)
    result = stitch_stage(blocks, data_spec, out_dir, init=init, probe_size=probe_size, seed=seed, stem=stem,
                          token_pool=token_pool, max_per_class=max_per_class, data_root=data_root,
                          recalibrate_norms=recalibrate_norms, head=head, overwrite=overwrite,
                          progress=sys.stderr.isatty())
    click.echo(describe_net(result["net"]))
    fits = [fit for fit in result["init"].get("fits", []) if "residual" in fit]
    if fits:
        residuals = ", ".join(f"{fit['layer']} {fit['residual']:.2f}" for fit in fits)
        click.echo(f"least-squares fit on {result['init']['probe']['images']} images of {result['data']} "
                   f"(relative residual: {residuals})")
    click.echo(f"wrote {Path(out_dir) / 'structure.json'} and {Path(out_dir) / 'model.safetensors'} "
               f"in {result['seconds']:.1f} s")


class ClassList(click.ParamType):
    """Comma-separated class indices, e.g. 0,1,2 (non-empty, distinct, non-negative)."""

    name = "CLASSES"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        parts = [p.strip() for p in str(value).split(",")]
        if not any(parts):
            self.fail("the class list is empty; name at least one class, e.g. 0,1,2", param, ctx)
        try:
            classes = [int(p) for p in parts]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of class indices (e.g. 0,1,2)", param, ctx)
        if min(classes) < 0 or len(set(classes)) != len(classes):
            self.fail(f"{value!r} must name distinct, non-negative class indices", param, ctx)
        return classes


UNIT = click.FloatRange(0, 1, max_open=True)


@cli.command("disassemble")
@click.argument("model_name", metavar="MODEL")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Weights of an architecture: .safetensors, or a torch file readable with weights_only=True.")
@click.option("--classes", required=True, type=ClassList(), help="The classes the component keeps, e.g. 0,1,2 (its "
                                                                 "logits come in this order).")
@click.option("--data", "data_spec", required=True,
              help="The dataset the model was trained on, all of its classes (e.g. cifar10); its training split gives "
                   "the samples.")
@click.option("--out", "out_dir", required=True, type=OutputDir(), help="Component folder to write.")
@click.option("--per-class", type=POSITIVE, default=50, show_default=True,
              help="Most confident correctly classified training images per class behind the contributions.")
@click.option("--max-per-class", type=POSITIVE, default=None,
              help="Read only a seeded draw of this many training images per class (faster; default: all).")
@click.option("--calibrate", is_flag=True,
              help="Choose alpha/beta on held-out training images: the fewest parameters over a grid whose component "
                   "is at least as accurate as the original there (instead of the paper's thresholds).")
@click.option("--held-out", type=POSITIVE, default=500, show_default=True,
              help="With --calibrate: training images per class, not among the samples, that judge the thresholds. "
                   "More give a steadier choice at the cost of one pass over them per grid point tried: on a model "
                   "that fits its training set, 500 per class can separate grid points by 1-3 images.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="With --calibrate: accuracy points the component may lose on the held-out images.")
@click.option("--restore/--no-restore", default=True, show_default=True,
              help="With --calibrate, when no grid point reaches the target: score each layer's pruning alone and "
                   "keep the costly layers whole, costliest first, until the component reaches it.")
@click.option("--match-loss", is_flag=True,
              help="With --calibrate: the component's held-out cross-entropy must not exceed the original's either. "
                   "Training images are fit almost perfectly, so their accuracy moves by a few images and cannot "
                   "tell a faithful component from a lucky one; the loss can. Restoration then orders layers by the "
                   "loss they add and always reaches the target, at worst keeping every channel (docs/lego.md).")
@click.option("--alpha-conv", type=UNIT, default=None, help="alpha for conv layers' inputs (paper: 0.3).")
@click.option("--beta-conv", type=UNIT, default=None, help="beta for conv layers' inputs (paper: 0.2).")
@click.option("--alpha-linear", type=UNIT, default=None, help="alpha for linear layers' inputs (paper: 0.4).")
@click.option("--beta-linear", type=UNIT, default=None, help="beta for linear layers' inputs (paper: 0.3).")
@click.option("--eval/--no-eval", "evaluate", default=True, show_default=True,
              help="Score the component and the original per class on the test split for report.md.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --max-per-class and held-out draws.")
@click.option("--overwrite", is_flag=True, help="Replace a folder --out that already holds something.")
@click.option("--threads", type=POSITIVE, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Folder holding the datasets.")
def disassemble_cmd(model_name, checkpoint, classes, data_spec, out_dir, per_class, max_per_class, calibrate,
                    held_out, tolerance, restore, match_loss, alpha_conv, beta_conv, alpha_linear, beta_linear,
                    evaluate, seed, overwrite, threads, data_root):
    """Model LEGO: cut the component for some classes out of a trained CNN, without training.

    The most confident correctly classified training images of each class give every conv/linear layer's
    relative contributions; thresholds on them (alpha, beta) keep the channels the classes rely on, followed
    through residual additions, depthwise convs and flattening; Torch-Pruning removes the rest. The component
    is a smaller plain model whose head has exactly --classes. OUT gets component.safetensors + component.json,
    routes.png (which channels each class uses, layer by layer) and report.md / report.json (parameters, MACs,
    accuracy per class against the original on the test split).

    \b
    reassembly disassemble vgg16_cifar10 --classes 0,1,2 --data cifar10 --out runs/vgg-012
    reassembly disassemble cifar_resnet20 --checkpoint resnet20.th --classes 0,1,2 --data cifar10 \\
        --calibrate --out runs/r20-012
    reassembly eval --model runs/vgg-012 --data 'cifar10[0,1,2]'
    reassembly assemble runs/r20-012 runs/vgg-345 --scale --out runs/six

    The paper's thresholds remove a lot and can cost accuracy (docs/lego.md); --calibrate picks them on
    held-out training images (never test images).
    """
    from .data import load_dataset
    from .lego.stage import check_classes, check_disassemblable, disassemble, thresholds, write_component

    if calibrate and any(v is not None for v in (alpha_conv, beta_conv, alpha_linear, beta_linear)):
        raise click.UsageError("give either --calibrate or explicit --alpha-*/--beta-* thresholds, not both")
    if threads:
        import torch

        torch.set_num_threads(threads)
    alpha, beta = thresholds(alpha_conv, beta_conv, alpha_linear, beta_linear)
    if checkpoint is None and not Path(model_name).is_dir() and not is_shipped(model_name):
        from .zoo import model_info

        if not model_name.startswith("timm:"):
            model_info(model_name)  # an unknown name is said (with the closest names) first
        raise click.UsageError(f"{model_name} has no trained weights to disassemble: give --checkpoint FILE or name a "
                               "shipped model (`reassembly zoo list`)")
    model = build_model(model_name, checkpoint=checkpoint)
    if hasattr(model, "reassembly_input_size") or hasattr(model, "structure"):
        raise click.UsageError(f"{model_name} is a saved network or component; disassemble the trained model it came "
                               "from")
    size = _default_input_size(model_name, model)
    check_classes(classes, check_disassemblable(model, size, model_name), model_name)  # before any data is read
    train = load_dataset(data_spec, "train", root=data_root, image_size=size[1], channels=size[0],
                         max_per_class=max_per_class, seed=seed)
    result = disassemble(model, train, classes, per_class=per_class, alpha=alpha, beta=beta, calibrate=calibrate,
                         held_out=held_out, tolerance=tolerance, restore=restore,
                         match_loss=match_loss, seed=seed, input_size=size,
                         model_name=model_name, dataset=train.name)
    test = load_dataset(data_spec, "test", root=data_root, image_size=size[1], channels=size[0]) if evaluate else None
    info = {"model": model_name, "checkpoint": checkpoint, "data": train.name, "train_images": len(train),
            "seed": seed}
    report = write_component(result, model, out_dir, test=test, overwrite=overwrite, class_names=train.classes,
                             info=info)
    p, m = report["params"], report["macs"]
    click.echo(f"component of {model_name} for classes {report['classes']}: {p['component']:,} parameters "
               f"({100 * p['ratio']:.1f} % of {p['original']:,}), {m['component']:,} MACs ({100 * m['ratio']:.1f} %)")
    if "calibration" in report:
        cal = report["calibration"]
        click.echo(f"thresholds calibrated on {cal['held_out_images']} held-out training images: conv "
                   f"{cal['alpha']['conv']}/{cal['beta']['conv']}, linear {cal['alpha']['linear']}/"
                   f"{cal['beta']['linear']}" + (f", layers kept whole: {', '.join(cal['kept_whole'])}"
                                                  if cal.get("kept_whole") else "") +
                   f"; {cal['tried'][cal['chosen']]['accuracy']:.2f} % against the original's "
                   f"{cal['original_accuracy']:.2f} %" + ("" if cal["met"] else " (target NOT met)"))
        if cal.get("match_loss"):
            click.echo(f"held-out cross-entropy: {cal['tried'][cal['chosen']]['loss']:.4f} against the original's "
                       f"{cal['original_loss']:.4f}")
        costs = cal.get("layer_costs") or {}
        if not cal["met"] and costs and not any(cost > 0 for cost in costs.values()):
            click.echo("no single layer's pruning costs held-out accuracy on its own, so none was restored: the loss "
                       "comes from several layers together; try --tolerance or other thresholds")
    if "accuracy" in report:
        acc = report["accuracy"]
        click.echo(f"test accuracy on classes {report['classes']}: component {acc['component']:.2f} %, original "
                   f"{acc['original']:.2f} % (argmax over the same classes)")
    spec = f"{train.name}[{','.join(map(str, report['classes']))}]"
    click.echo(f"wrote {out_dir} (component, routes.png, report.md); evaluate with `reassembly eval --model {out_dir} "
               f"--data '{spec}'`")


@cli.command("assemble")
@click.argument("components", metavar="COMPONENT...", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=OutputDir(), help="Assembly folder to write.")
@click.option("--merge", type=click.Choice(["parallel", "block-diagonal"]), default="parallel", show_default=True,
              help="parallel: each component a branch on the shared input, parameters = the sum of the parts; "
                   "block-diagonal: the paper's alignment-padding merge into one network (one architecture only; "
                   "the zero blocks count as parameters).")
@click.option("--scale", is_flag=True,
              help="Parameter scaling: divide each head row by the mean winning logit of correctly classified "
                   "training images of its class, so that the components' logits compare.")
@click.option("--data", "data_spec", default=None,
              help="With --scale: the dataset whose training split scales the heads (default: the one each "
                   "component was disassembled from).")
@click.option("--scale-per-class", type=POSITIVE, default=200, show_default=True,
              help="With --scale: training images per class (a seeded draw).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --scale-per-class draw.")
@click.option("--overwrite", is_flag=True, help="Replace a folder --out that already holds something.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Folder holding the datasets.")
def assemble_cmd(components, out_dir, merge, scale, data_spec, scale_per_class, seed, overwrite, data_root):
    """Model LEGO: join components (from `reassembly disassemble`) into one classifier over all their classes.

    Components may come from different models and architectures. Their logits are joined in ascending class
    order when they share a dataset (a class in two components is an error), so the assembly is evaluated on
    the union of their classes. OUT gets assembly.safetensors + assembly.json and report.json (parameters and
    MACs against the sum of the parts).

    \b
    reassembly assemble runs/r20-012 runs/vgg-345 --out runs/six
    reassembly assemble runs/r20-012 runs/vgg-345 --scale --out runs/six-scaled
    reassembly assemble runs/vgg-012 runs/vgg-345 --merge block-diagonal --out runs/six-merged
    reassembly eval --model runs/six-scaled --data 'cifar10[0:6]'
    """
    from .data import load_dataset
    from .lego.stage import assemble_components, load_components, write_assembly

    if len(components) < 2:
        raise click.UsageError("give at least two component folders to assemble")
    if data_spec is not None and not scale:
        raise click.UsageError("--data only says which data scales the heads; add --scale")
    parts = load_components(components)
    scale_data, cache = {}, {}
    if scale:
        for i, part in enumerate(parts):
            name = data_spec or part.reassembly_component.get("dataset")
            if not name:
                raise ReassemblyError(f"{components[i]} does not say which dataset it was disassembled from; pass "
                                      "--data to scale it")
            size = part.reassembly_input_size
            if name not in cache:
                cache[name] = load_dataset(name, "train", root=data_root, image_size=size[1], channels=size[0])
            scale_data[i] = cache[name]
    assembly = assemble_components(parts, mode=merge, scale=scale, scale_data=scale_data,
                                   scale_per_class=scale_per_class, seed=seed)
    info = {"components": list(components), "scaled": scale, "seed": seed}
    report = write_assembly(assembly, parts, out_dir, overwrite=overwrite, info=info)
    total = sum(report["params_of_parts"])
    classes = assembly.reassembly_classes
    click.echo(f"{merge} assembly of {len(parts)} components, classes {report['classes']}: {report['params']:,} "
               f"parameters (the parts: {total:,}), {report['macs']:,} MACs"
               + (", heads scaled on training images" if scale else ""))
    where = assembly.reassembly_dataset
    hint = (f"; evaluate with `reassembly eval --model {out_dir} --data '{where}[{','.join(map(str, classes))}]'`"
            if classes is not None and where else "")
    click.echo(f"wrote {out_dir}{hint}")


@cli.command("train")
@click.argument("net_dir", metavar="NET", type=click.Path(file_okay=False))
@click.option("--data", "data_spec", required=True, help="Target task, e.g. 'cifar10[5:10]' (train split; the test "
                                                         "split is evaluated after each epoch).")
@click.option("--mode", type=click.Choice(["frozen", "full"]), default="frozen", show_default=True,
              help="frozen: train the stem, stitches and head only (DeRy's FZ); full: train everything (FT).")
@click.option("--epochs", type=POSITIVE, default=None, help="Epochs (default: the recipe's, 10).")
@click.option("--lr", type=float, default=None, help="Peak AdamW learning rate (default 1e-3).")
@click.option("--batch-size", type=POSITIVE, default=None, help="Global batch size (default 128).")
@click.option("--max-per-class", type=POSITIVE, default=None,
              help="Train on this many images per class (one fixed seeded draw), e.g. 1000 for Split-CIFAR.")
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="Random crops (4 px padding) during training.")
@click.option("--flip/--no-flip", default=True, show_default=True,
              help="Random horizontal flips during training (turn off for digits and other oriented images).")
@click.option("--block-norm", type=click.Choice(["eval", "train"]), default="eval", show_default=True,
              help="Frozen mode: keep the blocks' batch-norm statistics (eval) or let them update (train, as the "
                   "official code did).")
@click.option("--head-start", type=click.Choice(["zero", "fitted"]), default=None,
              help="Start from a zeroed head or the stitched (least-squares) one; default: zero for full "
                   "fine-tuning (it beat the fitted head on the validation split, results/init-study), fitted for "
                   "frozen training.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", default=None, type=OutputDir(),
              help="Run directory (default NET/train-MODE); an unfinished run there is resumed.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Folder holding the datasets.")
def train_cmd(net_dir, data_spec, mode, epochs, lr, batch_size, max_per_class, augment, flip, block_norm, head_start,
              seed, out, data_root):
    """Train a stitched network (from `reassembly stitch`) on its target task.

    AdamW, warm-up then cosine decay, label smoothing 0.1, random crops and flips; a checkpoint after every epoch,
    and an interrupted run resumes where it stopped when the command is run again. The finished run directory holds
    the trained network (structure.json + model.safetensors) and a model card. Launch with `accelerate launch` to
    train on several GPUs or machines (the batch size is global).

    \b
    reassembly train runs/net --data 'cifar10[5:10]' --mode frozen --epochs 10 --max-per-class 1000
    reassembly eval --model runs/net/train-frozen --data 'cifar10[5:10]'
    """
    from .stitch.training import RECIPE, train_network

    updates = {key: value for key, value in (("epochs", epochs), ("lr", lr), ("batch_size", batch_size))
               if value is not None}
    updates.update(augment=augment, flip=flip)
    from pydantic import ValidationError

    from .errors import validation_message

    try:
        recipe = type(RECIPE)(**{**RECIPE.model_dump(), **updates})  # validated
    except ValidationError as exc:
        raise ReassemblyError(f"invalid training setting: {validation_message(exc)}") from None
    result = train_network(net_dir, data_spec, mode, recipe=recipe, out=out, seed=seed, block_norm=block_norm,
                           max_per_class=max_per_class, data_root=data_root, head_start=head_start,
                           progress=sys.stderr.isatty())
    final = result["final"]
    if final:
        click.echo(f"epoch {final['epoch']}/{recipe.epochs}: train loss {final['train_loss']:.3f}, "
                   f"test top-1 {final.get('test_top1', float('nan')):.2f} %")
    click.echo(f"wrote {result['out']}")


def chosen_blocks(path: str) -> str:
    """The block specs of the chosen network in a search.json."""
    try:
        return json.loads(Path(path).read_text())["choice"]["blocks"]
    except FileNotFoundError:
        raise ReassemblyError(f"{path} not found: write it with `reassembly search DIR ... --out {path}`") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ReassemblyError(f"{path} is not a search result with a chosen network (choice.blocks); write it with "
                              "`reassembly search`") from None


def describe_net(net) -> str:
    """A table of a reassembled network's parts with their parameters, and its totals."""
    from .measure import count_macs, count_params

    table = format_table(["part", "what", "params"], [list(row) for row in net.parts()], "llr")
    size = net.structure.input_size
    return f"{table}\n{count_params(net):,} parameters, {count_macs(net, size):,} MACs at {'x'.join(map(str, size))}"


@cli.group()
def nas():
    """DARTS architecture search with sandglass operations (docs/nas.md).

    A search trains a small network whose cell edges hold a softmax-weighted mixture of every candidate operation,
    alternating weight updates on one half of the training images with updates of the mixture weights (alpha) on
    the other half. The strongest operations then form a discrete cell, the genotype, and `nas train` trains a
    network stacked from that cell from scratch. The candidate operations are DARTS's eight (none, max/avg pool,
    skip, separable and dilated convs) and, in the `extend` space, the sandglass operations sg_3x3 and sg_5x5.

    \b
    reassembly nas search --space darts  --data cifar10 --out runs/nas/darts
    reassembly nas search --space extend --data cifar10 --out runs/nas/extend
    reassembly nas train runs/nas/extend/genotype.json --data cifar10 --out runs/nas/extend-train
    reassembly nas show DARTS_V2 --cells 20 --channels 36      the published cell: 3,349,342 parameters
    """


@nas.command("search")
@click.option("--space", default="darts", show_default=True,
              help="Candidate operations: darts (DARTS's 8), extend (those + sg_3x3, sg_5x5: 10), replace (separable "
                   "convs swapped for sandglass ops of the same kernel: 8).")
@click.option("--data", "data_spec", default="cifar10", show_default=True,
              help="Dataset whose training split is searched on (the test split is never read), e.g. cifar10.")
@click.option("--out", "out_dir", required=True, type=OutputDir(),
              help="Run directory; running the same command again resumes after the last finished epoch.")
@click.option("--epochs", type=POSITIVE, default=8, show_default=True, help="Search epochs (DARTS: 50).")
@click.option("--cells", type=POSITIVE, default=5, show_default=True,
              help="Cells of the search network; the ones at 1/3 and 2/3 of the depth reduce (DARTS: 8).")
@click.option("--channels", type=POSITIVE, default=8, show_default=True, help="C, the first cells' width (DARTS: 16).")
@click.option("--subset", type=POSITIVE, default=3_000, show_default=True,
              help="Training images drawn (with --seed); half train the weights, half the architecture "
                   "(DARTS: all 50,000).")
@click.option("--batch-size", type=POSITIVE, default=32, show_default=True, help="Images per step and half (DARTS: 64).")
@click.option("--order", default="first", show_default=True,
              help="first: alpha follows the validation gradient at the current weights; second: after a virtual "
                   "weight step (DARTS's unrolled update, about 3x the cost).")
@click.option("--sg-reduction", type=POSITIVE, default=2, show_default=True,
              help="t of the sandglass operations: their hidden width is C // t.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the image draw, init and data order.")
@click.option("--lr", type=float, default=0.025, show_default=True, help="Weights' learning rate (cosine to 0.001).")
@click.option("--arch-lr", type=float, default=3e-3, show_default=True,
              help="Adam learning rate of alpha (DARTS: 3e-4 over about 20,000 steps; raised tenfold for the few "
                   "hundred steps of a CPU search, so that alpha can move at all).")
@click.option("--threads", type=POSITIVE, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Folder holding the datasets.")
def nas_search(space, data_spec, out_dir, epochs, cells, channels, subset, batch_size, order, sg_reduction, seed, lr,
               arch_lr, threads, data_root):
    """Search a normal and a reduction cell with DARTS; writes OUT/genotype.json for `nas train`.

    Also written: alphas.json (the operation weights of both cell types after every epoch), log.jsonl (losses,
    accuracy on the architecture half, seconds per epoch) and state.pt (a checkpoint after every epoch). The
    defaults are sized for a 2-core CPU (about 25 minutes for darts, first order); DARTS's own search is
    --cells 8 --channels 16 --subset 50000 --epochs 50 (a GPU-day).

    \b
    reassembly nas search --space extend --data cifar10 --out runs/nas/extend --epochs 10
    reassembly nas search --space darts --order second --out runs/nas/darts-2nd
    """
    import torch

    from .nas import search

    if threads:
        torch.set_num_threads(threads)
    summary = search(data_spec, out_dir, space=space, epochs=epochs, cells=cells, channels=channels, subset=subset,
                     batch_size=batch_size, order=order, sg_reduction=sg_reduction, seed=seed, lr=lr,
                     arch_lr=arch_lr, data_root=data_root, progress=sys.stderr.isatty())
    final = summary["final"]
    click.echo(f"epoch {summary['epochs']}/{epochs}: architecture-half top-1 {final['val_top1']:.2f} %, "
               f"{summary['search_parameters']:,} search-network weights")
    if "genotype" in summary:
        from .nas import Genotype

        click.echo(Genotype.from_dict(summary["genotype"]).describe())
        click.echo(f"wrote {Path(out_dir) / 'genotype.json'} and {Path(out_dir) / 'alphas.json'} "
                   f"({summary['seconds']:.0f} s of search)")


@nas.command("train")
@click.argument("genotype", metavar="GENOTYPE")
@click.option("--data", "data_spec", default="cifar10", show_default=True,
              help="Dataset: trained on its train split, evaluated on its test split after every epoch.")
@click.option("--out", "out_dir", required=True, type=OutputDir(),
              help="Run directory; running the same command again resumes an unfinished run.")
@click.option("--epochs", type=POSITIVE, default=10, show_default=True, help="Training epochs (DARTS: 600).")
@click.option("--cells", type=POSITIVE, default=8, show_default=True, help="Cells of the network (DARTS: 20).")
@click.option("--channels", type=POSITIVE, default=16, show_default=True, help="C, the first cells' width (DARTS: 36).")
@click.option("--batch-size", type=POSITIVE, default=96, show_default=True)
@click.option("--lr", type=float, default=0.025, show_default=True, help="SGD learning rate (cosine to 0).")
@click.option("--drop-path", type=float, default=0.0, show_default=True,
              help="Drop-path probability, reached linearly by the end of the run (DARTS: 0.2 over 600 epochs).")
@click.option("--subset", type=POSITIVE, default=10_000, show_default=True,
              help="Train on at most this many training images, a fixed seeded draw (50000: all of CIFAR-10, as DARTS).")
@click.option("--sg-reduction", type=POSITIVE, default=None,
              help="Override the genotype's sandglass t (default: the genotype's, 2 unless it says otherwise).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="NHWC memory layout (on CPU about 1.7x faster for these depthwise and dilated convs).")
@click.option("--threads", type=POSITIVE, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Folder holding the datasets.")
def nas_train(genotype, data_spec, out_dir, epochs, cells, channels, batch_size, lr, drop_path, subset, sg_reduction,
              seed, channels_last, threads, data_root):
    """Train the network of GENOTYPE from scratch: a genotype.json from `nas search`, or DARTS_V1 / DARTS_V2.

    DARTS's evaluation recipe at a small scale: SGD with momentum 0.9, cosine learning rate, weight decay 3e-4,
    gradient clipping at 5, random crops and flips. It runs through the shared training loop (accelerate: CPU, one or
    many GPUs), with a checkpoint after every epoch; OUT ends up holding network.json and final.safetensors.
    The defaults (8 cells, C = 16, 10 epochs on 10,000 images) take about 50 minutes on a 2-core CPU; DARTS's
    setting is --cells 20 --channels 36 --epochs 600 --subset 50000 --drop-path 0.2. Not done here: cutout and the
    auxiliary head's loss (see docs/nas.md).

    \b
    reassembly nas train runs/nas/extend/genotype.json --data cifar10 --out runs/nas/extend-train
    reassembly nas train DARTS_V2 --data cifar10 --out runs/nas/darts-v2 --epochs 20
    """
    import torch

    from .nas import train

    if threads:
        torch.set_num_threads(threads)
    result = train(genotype, data_spec, out_dir, cells=cells, channels=channels, epochs=epochs, batch_size=batch_size,
                   lr=lr, drop_path=drop_path, subset=subset, seed=seed, sg_reduction=sg_reduction,
                   data_root=data_root, progress=sys.stderr.isatty(), channels_last=channels_last)
    final = result["final"]
    click.echo(f"{result['parameters']:,} parameters; epoch {final.get('epoch', 0)}/{epochs}: train loss "
               f"{final.get('train_loss', float('nan')):.3f}, test top-1 {final.get('test_top1', float('nan')):.2f} %")
    click.echo(f"wrote {result['out']}")


@nas.command("show")
@click.argument("genotype", metavar="GENOTYPE")
@click.option("--cells", type=POSITIVE, default=20, show_default=True, help="Cells of the evaluation network.")
@click.option("--channels", type=POSITIVE, default=36, show_default=True, help="C of the evaluation network.")
@click.option("--num-classes", type=POSITIVE, default=10, show_default=True)
@click.option("--sg-reduction", type=POSITIVE, default=None, help="Override the genotype's sandglass t.")
@click.option("--macs", is_flag=True, help="Also count MACs at 3x32x32 (about 15 s for 20 cells).")
def nas_show(genotype, cells, channels, num_classes, sg_reduction, macs):
    """Print a genotype's cells and the parameters of its evaluation network (auxiliary head excluded).

    \b
    reassembly nas show DARTS_V2                      3,349,342 parameters at 20 cells, C = 36
    reassembly nas show runs/nas/extend/genotype.json --cells 8 --channels 16 --macs
    """
    from .measure import count_macs
    from .nas import NetworkCIFAR, count_parameters, load_genotype

    cell = load_genotype(genotype)
    network = NetworkCIFAR(cell, channels, num_classes, cells, sg_reduction=sg_reduction)
    click.echo(cell.describe())
    cost = f", {count_macs(network.eval(), (3, 32, 32)):,} MACs at 3x32x32" if macs else ""
    click.echo(f"{count_parameters(network):,} parameters{cost} ({cells} cells, C = {channels}, {num_classes} classes)")


@cli.command("run")
@click.argument("recipe_path", metavar="[RECIPE]", required=False, type=click.Path(dir_okay=False))
@click.option("--demo", is_flag=True,
              help="Run the built-in demo recipe: a network for CIFAR-10 classes 5-9 from the split-cifar zoo.")
@click.option("--print-example", is_flag=True,
              help="Print the demo recipe, with comments, as a template to start from, and exit.")
@click.option("--out", "out_dir", default=None, type=OutputDir(),
              help="Run directory (default: the recipe's `out`, else runs/NAME). Stages already done there are "
                   "skipped.")
@click.option("--force", is_flag=True, help="Run every stage afresh, replacing what the run directory holds.")
@click.option("--threads", type=POSITIVE, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Folder holding the datasets.")
def run_cmd(recipe_path, demo, print_example, out_dir, force, threads, data_root):
    """Run a whole DeRy reassembly from a YAML recipe: similarity, partition, search, stitch, train, eval.

    Each stage writes the artifact its own verb writes, into one run directory: similarity/,
    partition.json, search.json, net/ (stitched), net/train-MODE/ (trained), baselines/ (the zoo models
    within the same budget, given a new head and trained the same way), eval.json, MODEL_CARD.md, and
    recipe.resolved.yaml (the recipe with every default filled in). At the end it prints the reassembled
    network next to those zoo models.

    Running the same command again skips every stage that is done; a stage whose recipe section changed,
    whose input changed or whose artifact is missing or corrupt runs again, and so does everything after
    it; an interrupted stage resumes (similarity batches, training epochs). --force starts afresh.

    \b
    A recipe (only data.target, zoo and search.budget are required; docs/run.md lists every key):
      data:
        target: cifar10[5:10]          # the task the network is for
        max_per_class: 300             # training images per class
      zoo: split-cifar                 # shipped models (names, or a group)
      similarity: {data: 'cifar10[0:5]', probe_size: 500}
      partition: {k: 4}
      search:
        budget: {params: 0.5M, macs: 60M}
        proxy: naswot
      train: {modes: [frozen], epochs: 1}

    \b
    reassembly run --print-example > my.yaml     a commented template
    reassembly run my.yaml --out runs/mine
    reassembly run --demo                        the built-in demo (3-6 minutes on 2 CPU cores)
    """
    from .pipeline import demo_path, example_text, run_recipe
    from .pipeline.report import comparison_table

    if print_example:
        click.echo(example_text(), nl=False)
        return
    if demo == (recipe_path is not None):
        raise click.UsageError("give a RECIPE file, or --demo for the built-in one (--print-example prints it)")
    if threads:
        import torch

        torch.set_num_threads(threads)
    source = demo_path() if demo else recipe_path
    command = "reassembly run " + ("--demo" if demo else recipe_path) + (f" --out {out_dir}" if out_dir else "")
    result = run_recipe(source, out_dir, force=force, data_root=data_root, progress=sys.stderr.isatty(),
                        echo=click.echo, command=command)
    if not result.finished:
        click.echo(f"the run so far, on one page: {result.report}")
        return
    click.echo("")
    click.echo(comparison_table(result.eval))
    modes = result.recipe.train.modes
    final = result.out / "net" / (f"train-{modes[-1]}" if modes else "")
    click.echo(f"\nthe reassembled network: {final}; its model card: {result.out / 'MODEL_CARD.md'}")
    click.echo(f"the whole run on one page (CKA, partition, search, training, comparison): {result.report}")


@cli.command("report")
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path(file_okay=False))
@click.option("--out", default=None, type=OutputFile(), help="Where to write the page (default: RUN_DIR/report.html).")
@click.option("--open", "open_page", is_flag=True, help="Then open it in the web browser.")
def report_cmd(run_dir, out, open_page):
    """Write one self-contained HTML page showing a `reassembly run` directory.

    The page holds the resolved recipe, the CKA heatmaps, the partition diagram (which nodes of each model
    fall in which block), the search candidates on a proxy-score-against-parameters plot with the chosen one
    starred, the training curves, the table against the zoo models within the budget, and the model card.
    Images are embedded and the style is inline: the file needs no network and no other file, so it can be
    mailed or archived alone. A stage that has not finished yet gets a note instead of its section.

    `reassembly run` writes RUN_DIR/report.html itself at the end of every call; this command writes it
    again (after an interrupted run, or after changing the package) or elsewhere.

    \b
    reassembly report runs/demo                      writes runs/demo/report.html
    reassembly report runs/demo --out demo.html --open
    """
    from .pipeline.html_report import write_html_report

    path = write_html_report(run_dir, out)
    click.echo(f"wrote {path}")
    if open_page:
        import webbrowser

        if not webbrowser.open(path.resolve().as_uri()):
            click.echo(f"no web browser could be started here; open {path} yourself")


@cli.command("search")
@click.argument("partition_dir", metavar="DIR", type=click.Path(exists=True))
@click.option("--data", "data_spec", required=True,
              help="Target task whose training images the proxy sees, e.g. 'cifar10[5:10]' (it also sets the head's "
                   "classes).")
@click.option("--params", default=None, help="Most parameters of the whole network, e.g. 0.5M or 500K.")
@click.option("--macs", default=None, help="Most MACs of one image at the network's input size, e.g. 60M.")
@click.option("--latency", default=None, help="Most CPU latency of one image, e.g. 2.5ms (measured on this machine).")
@click.option("--min-params", default=None, help="Fewest parameters (proxies favour big networks; DeRy used floors).")
@click.option("--min-macs", default=None, help="Fewest MACs.")
@click.option("--min-latency", default=None, help="Least latency, e.g. 1ms.")
@click.option("--proxy", default="naswot", show_default=True,
              help="Transfer proxies, scored after a least-squares fit of each network: fit, fit_loss, logme, knn. "
                   "Architecture proxies, at the default initialisation: naswot, naswot_official, synflow, "
                   "jacob_cov, grad_norm. Baselines: params, macs. Or MODULE:FUNCTION for your own.")
@click.option("--also", default="", metavar="PROXY,...",
              help="Also score the same networks with these proxies (each candidate's `scores` in search.json); "
                   "the ranking stays --proxy's.")
@click.option("--max-scored", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Assemble and score every network within the budget when there are at most this many; above "
                   "it, only the program's --top-k by a surrogate objective (0: always the program).")
@click.option("--top-k", type=POSITIVE, default=20, show_default=True,
              help="Above --max-scored: networks the program enumerates by the surrogate, best first; each is "
                   "assembled and scored by the proxy.")
@click.option("--probe-size", type=click.IntRange(min=2), default=256, show_default=True,
              help="Transfer proxies: training images each network is fitted on (the proxy's batches are drawn "
                   "from the others).")
@click.option("--own-stems/--no-own-stems", default=True, show_default=True,
              help="Let a first block keep its model's own stem, so that every zoo model is itself a candidate.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the target batches and of the stem, stitch and head initialisation.")
@click.option("--batches", type=POSITIVE, default=5, show_default=True, help="Target batches the proxy averages over.")
@click.option("--batch-size", type=POSITIVE, default=32, show_default=True, help="Images per target batch.")
@click.option("--order", type=click.Choice(["dery", "any"]), default="dery", show_default=True,
              help="dery: no transformer block before a CNN block and a CNN block first (the official rule); any: "
                   "every pair a stitch can join.")
@click.option("--method", type=click.Choice(["partition", "cuts"]), default="partition", show_default=True,
              help="How the top-k are enumerated: branching on no-good cuts (fast) or adding them as rows.")
@click.option("--time-limit", type=float, default=None,
              help="Seconds per solve; a solve stopped early reports its optimality gap.")
@click.option("--max-per-class", type=POSITIVE, default=None,
              help="Draw the proxy's images only from this many training images per class (the subset `reassembly "
                   "stitch/train --max-per-class` use).")
@click.option("--threads", type=POSITIVE, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--out", default=None, type=OutputFile(),
              help="Where to write the result (default: search.json beside partition.json).")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Folder holding the datasets.")
def search_cmd(partition_dir, data_spec, params, macs, latency, min_params, min_macs, min_latency, proxy, also,
               max_scored, top_k, probe_size, own_stems, seed, batches, batch_size, order, method, time_limit,
               max_per_class, threads, out, data_root):
    """DeRy stage 3: pick one block per equivalence set, within a budget, ranked by a training-free proxy.

    DIR holds partition.json (from `reassembly partition`). A network takes one block per set and must meet the
    budget and the compatibility rules: every block runs on the grid it was trained on, no pair a stitch cannot
    join, DeRy's order rule. Parameters and MACs count the whole network: stem, blocks, stitches and head. A first
    block may keep its model's own stem, so each zoo model is itself a candidate (where each ranked is printed).

    When at most --max-scored networks meet the budget, every one is assembled and scored by the proxy on
    --batches seeded batches of --data's training images (a transfer proxy first fits the network in closed
    form on --probe-size other images, as `reassembly stitch` does). Otherwise an exact 0-1 program (HiGHS)
    finds the --top-k networks with the largest sum of per-block proxy terms (each measured inside its own
    pretrained model) and only those are scored.

    search.json lists the ranked candidates, the zoo models' ranks, which networks were scored, and the choice;
    pass the choice on with `reassembly stitch --blocks "$(jq -r .choice.blocks search.json)"`. Sizes take K, M,
    G (0.5M = 500,000); latency takes ms, us or s.

    \b
    reassembly search runs/sim --data 'cifar10[5:10]' --params 0.5M --macs 60M
    reassembly search runs/sim --data 'cifar10[5:10]' --params 0.5M --macs 60M --proxy fit --also logme,knn
    reassembly search runs/sim --data 'cifar10[5:10]' --params 1M --min-params 0.5M --max-scored 0 --top-k 50
    reassembly search runs/sim --data digits --latency 2ms --proxy params --top-k 5
    """
    import torch

    from .search import Budget
    from .search.stage import search_stage

    if threads:
        torch.set_num_threads(threads)
    budget = Budget.parse(params, macs, latency, min_params, min_macs, min_latency)
    record = search_stage(partition_dir, data_spec, budget, proxy=proxy, top_k=top_k, seed=seed, batches=batches,
                          batch_size=batch_size, order=order, method=method, time_limit=time_limit, out=out,
                          data_root=data_root, max_per_class=max_per_class, max_scored=max_scored,
                          probe_size=probe_size, own_stems=own_stems,
                          also=tuple(name.strip() for name in also.split(",") if name.strip()),
                          progress=sys.stderr.isatty())
    program = record["program"]
    latency_column = any("latency_ms" in c for c in record["candidates"])
    headers = ["rank", "program", record["proxy"]["name"], "params", "MACs"] + (["ms"] if latency_column else []) + \
        ["blocks"]
    rows = []
    for c in record["candidates"]:
        score = "-inf" if c["proxy"] is None else f"{c['proxy']:.4g}"
        mark = "" if c["within_budget"] else " (over budget as measured)"
        rows.append([c["rank"], c["program_rank"], score, human(c["params"]), human(c["macs"])]
                    + ([f"{c['latency_ms']:.2f}"] if latency_column else []) + [",".join(c["blocks"]) + mark])
    click.echo(format_table(headers, rows, "rrrrr" + ("r" if latency_column else "") + "l"))
    click.echo(f"scored {record['selection']['text']} ({program['space']:,} combinations; "
               f"{record['timings']['assemble_and_score']:.1f} s to assemble and score by {record['proxy']['name']})")
    for zoo in record["zoo_models"]:
        where = f"rank {zoo['rank']} of {record['scored']}" if zoo["rank"] else zoo["note"]
        size = f" ({human(zoo['params'])}, {human(zoo['macs'])} MACs)" if zoo.get("params") else ""
        click.echo(f"zoo model {zoo['name']}{size}: {where}")
    for note in record["notes"]:
        click.echo(f"note: {note}")
    click.echo(f"choice: {record['choice']['blocks']} ({record['choice']['summary']})")
    click.echo(f"wrote {record['out']}")


def main() -> None:
    cli(prog_name="reassembly")


if __name__ == "__main__":
    main()
