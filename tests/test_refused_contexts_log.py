"""A PACS that proposes SOP classes the node does not take is told so in the log once per
calling AE, not on every association: the line a bounced result would add must stand out."""

from __future__ import annotations

from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, Verification

from tests.conftest import wait_for

REFUSED = "refused 1 presentation context(s) from {caller}, SOP class not processed:"


def associate(port: int, caller: str) -> None:
    ae = AE(ae_title=caller)
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage)  # not processed: refused
    assoc = ae.associate("127.0.0.1", port, ae_title="COVID_PLUGIN")
    assert assoc.is_established
    assoc.release()


def test_refused_contexts_are_logged_once_per_calling_ae(node_factory):
    node = node_factory().start()
    for caller in ("PACS1", "PACS1", "PACS1", "PACS2", "PACS2"):
        associate(node.port, caller)
    wait_for(lambda: node.log().count("association from PACS2") >= 2, timeout=10,
             what="five associations logged")
    log = node.log()
    assert log.count("association from PACS1") == 3  # three associations, one refusal line
    assert log.count(REFUSED.format(caller="PACS1")) == 1
    assert log.count(REFUSED.format(caller="PACS2")) == 1
