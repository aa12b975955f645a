"""Export by DICOMweb: result files from the outbox to a STOW-RS service (PS3.18 10.5).

The same contract as node/scu.py's DicomSender: `deliver(items)` returns, per outbox item,
None when the server stored it or the error, and the outbox decides the backoff and the dead
letter. The multipart encoding is dicomweb-client's; its own retries are off, because the
outbox already retries, durably and across restarts, without blocking the sender thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from covid_plugin.config import DicomwebDestination
from covid_plugin.store.outbox import OutboxItem

log = logging.getLogger(__name__)


def _reply_of(response: requests.Response | None) -> Dataset | None:
    """The STOW-RS response body (a 409 still lists which instances failed), if it has one."""
    if response is None or not response.content:
        return None
    if response.headers.get("Content-Type", "").split(";")[0].strip() not in (
            "application/dicom+json", "application/json"):
        return None
    try:
        return Dataset.from_json(response.json())
    except ValueError:
        return None


class _Session(requests.Session):
    """A session whose own `verify` (the destination's CA file, or off) is not overridden by
    REQUESTS_CA_BUNDLE: requests lets the environment win over session settings (psf/requests
    issue 3829), and a node's configured trust must not depend on its environment."""

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if verify is None and self.verify is not True:
            settings["verify"] = self.verify
        return settings


class StowSender:
    """Sends files to the configured DICOMweb destinations, one POST per destination and round."""

    def __init__(self, destinations: Iterable[DicomwebDestination]) -> None:
        self._destinations = {d.url: d for d in destinations}
        self._clients: dict[str, DICOMwebClient] = {}

    def _client(self, destination: DicomwebDestination) -> DICOMwebClient:
        if destination.url not in self._clients:
            session = _Session()
            session.verify = str(destination.ca_file) if destination.ca_file else (
                destination.verify_tls)
            if destination.cert_file is not None:
                session.cert = (str(destination.cert_file), str(destination.key_file)) if (
                    destination.key_file) else str(destination.cert_file)
            client = DICOMwebClient(destination.url, session=session,
                                    headers=dict(destination.headers) or None,
                                    timeout=destination.timeout_s)
            client.set_http_retry_params(retry=False)
            self._clients[destination.url] = client
        return self._clients[destination.url]

    def deliver(self, items: list[OutboxItem],
                on_result: Callable[[int, str | None], None] | None = None
                ) -> dict[int, str | None]:
        """One STOW-RS request stores the batch: every item's answer comes with its reply,
        in the result (`on_result` has nothing to hear before it)."""
        url = items[0].dest_url
        destination = self._destinations.get(url or "")
        if destination is None:
            # the config changed since the job finished; `covid-plugin retry` after fixing it
            return {item.id: f"DICOMweb destination {url} is no longer configured"
                    for item in items}
        results: dict[int, str | None] = {}
        datasets: dict[int, Dataset] = {}
        for item in items:
            try:
                datasets[item.id] = dcmread(item.path)
            except (OSError, InvalidDicomError) as exc:
                results[item.id] = f"result file unreadable: {exc}"
        if not datasets:
            return results
        unconfirmed: str | None = None  # what an instance the reply does not list gets
        try:
            reply = self._client(destination).store_instances(list(datasets.values()))
        except requests.HTTPError as exc:
            response = exc.response
            status = (response.status_code, response.reason) if response is not None else ("?", "")
            unconfirmed = f"{url} answered HTTP {status[0]} {status[1]}".strip()
            reply = _reply_of(response) or Dataset()
        except (requests.RequestException, ValueError) as exc:
            # refused, timed out, TLS failure, or an answer that is not STOW-RS
            error = f"STOW-RS to {url} failed: {type(exc).__name__}: {str(exc)[:400]}"
            return results | {item_id: error for item_id in datasets}
        return results | self._outcomes(url or "", reply, datasets, unconfirmed)

    @staticmethod
    def _outcomes(url: str, reply: Dataset, sent: dict[int, Dataset],
                  unconfirmed: str | None) -> dict[int, str | None]:
        """Per instance, from the response's Referenced (stored) and Failed SOP Sequences.

        A 2xx reply that lists nothing means all were stored (some servers answer 200 with no
        body); after an HTTP error, an instance the reply does not list as stored failed.
        """
        failed = {str(i.ReferencedSOPInstanceUID): int(i.get("FailureReason", 0))
                  for i in reply.get("FailedSOPSequence", [])}
        stored = {str(i.ReferencedSOPInstanceUID) for i in reply.get("ReferencedSOPSequence", [])}
        listed = bool(failed or stored)
        results: dict[int, str | None] = {}
        for item_id, ds in sent.items():
            uid = str(ds.SOPInstanceUID)
            if uid in failed:
                results[item_id] = f"{url} refused the instance (FailureReason 0x{failed[uid]:04X})"
            elif uid in stored:
                results[item_id] = None
            elif unconfirmed is not None:
                results[item_id] = unconfirmed
            else:
                results[item_id] = f"{url} did not confirm the instance" if listed else None
        return results
