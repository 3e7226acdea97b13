"""The help screen: every screen and its keys."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# Distill

| key | where | what |
|---|---|---|
| `d` `s` `t` `g` `e` (`f2`…`f6`) | everywhere | dashboard, dataset, training, generate, editor |
| `escape` | in a field | leave it (letters become keys again) |
| `ctrl+p` | everywhere | command palette |
| `?` `f1` | everywhere | this help |
| `q` | everywhere | quit |
| `enter` | dashboard jobs | open the job on the training screen |
| `u` | dataset | upload the folder and preprocess it |
| `n` | training | start training with the form's settings |
| `c` / `r` | training | cancel / retry the job shown |
| `p` | training previews | play the selected preview |
| `n` | generate | sample sounds with the form's settings (or `enter` in a field) |
| `m` | generate | refresh the list of models |
| `p` / `x` | generate | play the selected sound here / export all to the folder |
| `o` | editor | encode the sound named in the field (a file, or `gen:N`) into the grid |
| `enter` | editor sound field | encode it into the grid focused last (in the export field: export) |
| arrows / shift+arrows | editor grid | move / select a region; `tab` moves to the other grid |
| `home` `end` | editor grid | the cursor to the grid's first / last step |
| `+` `-` | editor | change the code under the cursor |
| `y` `v` `w` | editor | copy the selection, paste at the cursor, swap it with the other grid |
| `b` `a` `k` | editor | blend with the other sound, resample the selection with the prior, keep the first k levels (k = cursor's level) |
| `u` `r` | editor | undo, redo |
| `p` `x` | editor | play the coarse preview, export at full quality |
| `tab` | everywhere | next field |

The UI talks to the broker only through its requests and event stream: it works the same
over SSH or against a broker on another machine (`--broker tcp://HOST:5555`).
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,question_mark", "dismiss", "Close"),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Markdown(HELP)

    async def action_dismiss(self, result: None = None) -> None:
        self.dismiss(result)
