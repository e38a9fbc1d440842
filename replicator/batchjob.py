"""What every batched write job shares (pure): the state of the batch in flight as
:func:`replicator.inject.run` sees it, and what happens when its replies are lost.

A job (:class:`replicator.inject.Injection`, :class:`replicator.bulkwrite.RecordWrites`)
sends one datagram of requests at a time and waits for the reply to its last request;
``ENOBUFS`` on the socket means some replies were dropped, and a batch whose last
reply never comes is closed by :meth:`BatchJob.settle` once the socket is drained.
What a closed batch means (applied, refused, to verify) is each job's own
:meth:`BatchJob._finish`.
"""

from __future__ import annotations


class BatchJob:
    """The driving state shared by batched write jobs (see the module doc).

    A subclass sets ``_batch`` (the batch in flight, ``None`` when none) and ``_lost``,
    and implements :meth:`_finish` (closes ``_batch``, setting it to ``None``).
    """

    _batch: object | None
    _lost: bool

    @property
    def waiting(self) -> bool:
        """Whether the datagram last sent still expects replies."""
        return self._batch is not None

    @property
    def lost(self) -> bool:
        """Whether replies to the current batch were lost (``ENOBUFS`` was reported)."""
        return self._lost

    def replies_lost(self) -> None:
        """The socket reported ``ENOBUFS``: some replies to the current batch are gone."""
        self._lost = True

    def settle(self) -> None:
        """Close a batch whose last reply was lost (call once the socket is drained)."""
        if self._batch is not None:
            self._lost = True
            self._finish()

    def _finish(self) -> None:
        raise NotImplementedError
