"""`lit-inversion` command line: a LightningCLI over the same modules the Python API uses.

    lit-inversion fit --config configs/sipit.yaml [--results_path out.jsonl] [--ckpt_path last]
"""

from __future__ import annotations

import signal
import sys
from argparse import ArgumentError

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_inversion.console import quiet
from lit_inversion.distributed import use_for_ddp
from lit_inversion.errors import InversionError


class InversionCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # An inversion job only fits (validate/test/predict have nothing to evaluate), and this frees
        # `--verbose`, which those subcommands' Trainer methods would claim.
        return {"fit": LightningCLI.subcommands()["fit"]}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--results_path", type=str, default="results/results.jsonl",
                            help="JSONL file that gets one record per target as it finishes")
        parser.link_arguments("results_path", "model.init_args.results_path")
        parser.add_argument("--verbose", action="store_true",
                            help="also show the libraries' info lines, tips and warnings (hidden by default)")


def use_method_configs() -> None:
    """`--model.method GcgConfig` picks a method's config class by name (the dataclasses are subclass
    types), and `--help` shows the docstring under each of its fields."""
    from lit_inversion.dlmi.config import OutputConfig
    from lit_inversion.sipit.config import StatesConfig

    set_parsing_settings(subclasses_enabled=[OutputConfig, StatesConfig], docstring_parse_attribute_docstrings=True)


def main(args: list[str] | None = None) -> None:
    import lightning as L

    argv = sys.argv[1:] if args is None else list(args)
    quiet(verbose="--verbose" in argv)  # before parsing: seeding and the Trainer already print
    use_for_ddp()  # `--trainer.strategy ddp` (and auto on several devices) without the gradient-averaging wrapper
    use_method_configs()
    try:
        InversionCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            # No model summary: the frozen LM is not a submodule, so it would be a table of zeros.
            trainer_defaults={"max_epochs": 1, "num_sanity_val_steps": 0, "use_distributed_sampler": False,
                              "enable_model_summary": False, "log_every_n_steps": 1},
            parser_kwargs={"exit_on_error": False},  # raise parse errors, so they end in one summary line
            args=args,
        )
    except ArgumentError as err:  # bad arguments or config, as jsonargparse's nested multi-line report
        if "\n" in str(err):
            print(err, file=sys.stderr)  # the details, above their summary
        print(f"lit-inversion: error: {_one_line(str(err))} (--help lists the options)", file=sys.stderr)
        sys.exit(2)
    except InversionError as err:
        print(f"lit-inversion: error: {err}", file=sys.stderr)
        sys.exit(2)
    except SIGTERMException:
        # Lightning stopped at the end of the step (DLMI: the slots not yet stepped skipped it; SIP-It: the
        # target in progress was abandoned); every finished target is in the results file, last.ckpt is saved.
        print("lit-inversion: stopped by SIGTERM: finished targets are in the results file; run the same command "
              "with --ckpt_path last to resume", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except ValueError as err:
        # A config class that rejects a value while jsonargparse instantiates it: jsonargparse wraps our
        # InversionError in a union-subtype report. Print the rejection, not the report's traceback.
        if "Does not validate against any of" not in str(err):
            raise
        print(f"lit-inversion: error: {_one_line(str(err))} (--help lists the options)", file=sys.stderr)
        sys.exit(2)


# Lines of jsonargparse's report that say nothing about this error: union bookkeeping and the Optional branch.
_BOILERPLATE = ("Does not validate against any of", "Subtypes:", "Errors:", "Expected a <class 'NoneType'>",
                "Given value type:")


def _one_line(report: str, limit: int = 300) -> str:
    parts = []
    for line in report.splitlines():
        line = line.strip().removeprefix("- ")
        if not line or line.startswith(_BOILERPLATE):
            continue
        if line.startswith("Given value:"):  # only worth repeating when short (the whole model dict is not)
            if len(line) > 80:
                continue
            line = f"({line[0].lower()}{line[1:]})"
        parts.append(line)
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 3] + "..."


if __name__ == "__main__":
    main()
