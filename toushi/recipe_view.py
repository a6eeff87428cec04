"""The recipe as a stage sees it: read-only, and only the keys its entry in ``toushi/stages.py`` declares.

A stage's fingerprint covers the recipe keys it declares (``Stage.sections``). A stage that read a key it did
not declare would stay "up to date" when that key changes, so the runner hands each stage this view instead
of the recipe: reading an undeclared key raises :class:`UndeclaredRead`, naming the stage and the key, and
the declaration and the code cannot drift apart. A declared key gives the real value (a whole section when
the section is declared); a key above a declared one (``models`` when ``models.weak`` is declared) gives a
view of its own.
"""

from __future__ import annotations

from pydantic import BaseModel

from toushi.errors import ToushiError

# Keys every stage may read: where the run lives, which stages it has, and the experiment tracker (`train`:
# where metrics are logged). They change no stage's output.
ALWAYS = ("run.name", "run.dir", "run.stages", "train")


class UndeclaredRead(ToushiError, RuntimeError):
    """A stage read a recipe key that its entry in toushi/stages.py does not list (a bug in toushi)."""


class RecipeView:
    """Read-only attribute access to a recipe (or a section of it) limited to ``allowed`` dotted keys."""

    __slots__ = ("_obj", "_allowed", "_stage", "_prefix")

    def __init__(self, obj: BaseModel, allowed: tuple[str, ...], stage: str, prefix: str = ""):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_allowed", tuple(allowed) + ALWAYS)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str):
        obj = self._obj
        key = self._prefix + name
        if name not in type(obj).model_fields:
            if key == "run_dir":  # the run's directory (run.dir / run.name): always readable
                return obj.run_dir
            raise UndeclaredRead(f"stage {self._stage} uses recipe.{key}: only declared keys can be read")
        value = getattr(obj, name)
        if any(key == a or key.startswith(a + ".") for a in self._allowed):
            return value
        if isinstance(value, BaseModel) and any(a.startswith(key + ".") for a in self._allowed):
            return RecipeView(value, self._allowed, self._stage, key + ".")
        raise UndeclaredRead(f"stage {self._stage} reads recipe key {key}, which its entry in toushi/stages.py "
                             "does not declare: a change to it would not rerun the stage")

    def __setattr__(self, name, value):
        raise UndeclaredRead(f"stage {self._stage} sets recipe.{self._prefix}{name}: the recipe is read-only")

    def __repr__(self) -> str:
        return f"RecipeView({self._stage}: {', '.join(self._allowed)})"


def whole(recipe: RecipeView | BaseModel) -> BaseModel:
    """The recipe behind a view, for what reads it whole in another process: a training stage saves it for
    its trainer (which reads the sections the trainer uses; the launch itself reads only the stage's own)."""
    return recipe._obj if isinstance(recipe, RecipeView) else recipe
