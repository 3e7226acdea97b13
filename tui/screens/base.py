"""What every Distill screen shares: it listens to the app's cluster messages while mounted,
and shows the connection state in its header."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from rich.text import Text
from textual.screen import Screen
from textual.widgets import Select

from distill.shared.ids import escaped

if TYPE_CHECKING:
    from textual.notifications import SeverityLevel

    from distill.tui.app import DistillApp


class DistillScreen(Screen[None]):
    @property
    def distill(self) -> DistillApp:
        return cast("DistillApp", self.app)

    def on_mount(self) -> None:
        # Textual calls this for the base class as well as the subclass's own on_mount.
        if self not in self.distill.screens_listening:
            self.distill.screens_listening.append(self)

    def on_unmount(self) -> None:
        if self in self.distill.screens_listening:
            self.distill.screens_listening.remove(self)

    def check_worker(self, service: str) -> None:
        """DistillError when the last poll found no worker of ``service`` (a request to it
        would wait out the broker's 30-s request timeout to say so)."""
        from distill.shared.errors import DistillError

        app = self.distill
        if app.polled and app.connected and not any(
                w.get("service") == service for w in app.cluster_workers):
            raise DistillError(f"no {service} worker is registered with the broker: start one "
                               f"(`distill up`, or `distill worker {service.rsplit('.', 1)[-1]}`)")

    def notify(self, message: str, *, title: str = "", severity: SeverityLevel = "information",
               timeout: float | None = None, markup: bool = False) -> None:
        """Textual's notice, plain text by default: notices quote file and model names, job
        errors and the broker's words ("[/red].wav" crashed the app), and none needs markup."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    def notify_error(self, what: str, error: Any) -> None:
        self.notify(f"{what}: {error}", severity="error", timeout=8)

    @staticmethod
    def fill_models(select: Select[str], models: list[tuple[str, str]]) -> None:
        """List (name, sha256) models in ``select``, each name as it is (a str prompt is markup:
        "[/red]evil.distill" crashed the list, "kit [v2].distill" showed as "kit .distill");
        the model chosen stays chosen while it is listed (a refresh chose the first)."""
        current = select.value
        select.set_options([(Text(f"{escaped(name)}  {sha[:12]}"), sha) for name, sha in models])
        shas = [sha for _, sha in models]
        if models:
            select.value = current if current in shas else shas[0]

    async def fetch_models(self) -> list[tuple[str, str]] | None:
        """The broker's model artifacts as (name, sha256); None (and a notice) on an error."""
        from distill.shared.errors import DistillError

        try:
            listed = await self.distill.client.request(
                "distill.artifacts", {"op": "list", "kind": "model", "job": None})
        except DistillError as e:
            self.notify_error("models", e)
            return None
        return [(a.get("name", "?"), a["sha256"]) for a in listed.get("artifacts") or []]
