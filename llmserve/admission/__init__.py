"""Admission control: a bounded queue in front of the engine, with deadlines and tier priority.

    queue = AdmissionQueue.from_config(config, observer=metrics)
    header = request.headers.get(REQUEST_TIMEOUT_HEADER)
    deadline = request_deadline(header, config.queue.default_timeout_seconds, queue.clock())
    ticket = queue.enqueue(priority=tier.priority, tokens=prompt + max_tokens, deadline=deadline)
    while not await ticket.wait(timeout=heartbeat):   # streaming: heartbeat while queued
        send(f": queued position={ticket.position} eta_ms=...")  # eta_seconds may be None
    try: ... generate ...
    finally: ticket.release()

Errors raised (all APIError, rendered by the error middleware):
    enqueue      ServiceUnavailable 503 server_overloaded (+ Retry-After), shutting_down,
                 DeadlineExceeded 504 deadline_exceeded (deadline already past)
    wait         ServiceUnavailable 503 queue_timeout (+ Retry-After), shutting_down,
                 DeadlineExceeded 504 deadline_exceeded
"""

from llmserve.admission.deadline import REQUEST_TIMEOUT_HEADER, request_deadline
from llmserve.admission.drain import DrainRate, retry_after_seconds
from llmserve.admission.errors import DeadlineExceeded
from llmserve.admission.fairness import FairQueue, default_weight
from llmserve.admission.observer import AdmissionObserver, NullObserver, RejectReason
from llmserve.admission.queue import AdmissionQueue
from llmserve.admission.ticket import Slot, Ticket, TicketState
from llmserve.clock import ManualClock

__all__ = [
    "REQUEST_TIMEOUT_HEADER",
    "AdmissionObserver",
    "AdmissionQueue",
    "DeadlineExceeded",
    "DrainRate",
    "FairQueue",
    "ManualClock",
    "NullObserver",
    "RejectReason",
    "Slot",
    "Ticket",
    "TicketState",
    "default_weight",
    "request_deadline",
    "retry_after_seconds",
]
