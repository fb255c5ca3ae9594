"""Segmind's API contract as the emulator enforces it: the model's body schema, the output
formats, the default error messages and the HTML error page of its front proxy.
"""

from __future__ import annotations

from typing import Any

ASPECT_RATIOS: tuple[str, ...] = (
    "match_input_image",
    "1:1",
    "16:9",
    "9:16",
    "4:3",
    "3:4",
    "3:2",
    "2:3",
    "4:5",
    "5:4",
    "21:9",
    "9:21",
    "2:1",
    "1:2",
)
OUTPUT_FORMATS = ("jpg", "png")
BODY_KEYS = frozenset(
    {
        "prompt",
        "input_image_1",
        "input_image_2",
        "aspect_ratio",
        "output_format",
        "safety_tolerance",
        "seed",
    }
)
SEED_MAX = 4_294_967_295
MAX_INPUT_BYTES = 50 * 1024 * 1024

DEFAULT_ERRORS: dict[int, str] = {
    400: "Bad Request: invalid parameters",
    401: "Unauthorized: invalid or missing API key",
    403: "Forbidden: insufficient permissions",
    404: "Model not found",
    405: "Method Not Allowed",
    406: "Insufficient credits. Please add credits to continue.",
    422: "Unprocessable Entity: validation failed",
    429: "Rate limit exceeded. Please try again later.",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

CONTENT_TYPES = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif"}


def validate(payload: Any) -> str | None:
    """The error message for a body that breaks the model's schema, else None."""
    if not isinstance(payload, dict):
        return "Request body must be a JSON object"
    unknown = sorted(set(payload) - BODY_KEYS)
    if unknown:
        return f"Unknown parameter(s): {', '.join(unknown)}"
    for key in ("prompt", "input_image_1", "input_image_2"):
        if key not in payload:
            return f"{key} is required"
        if not isinstance(payload[key], str):
            return f"{key} must be a string"
    if not payload["prompt"].strip():
        return "prompt must not be empty"
    for key in ("input_image_1", "input_image_2"):
        if not payload[key].startswith(("http://", "https://")):
            return f"{key} must be an http(s) URI"
    if "aspect_ratio" in payload and payload["aspect_ratio"] not in ASPECT_RATIOS:
        return f"aspect_ratio must be one of {', '.join(ASPECT_RATIOS)}"
    if "output_format" in payload and payload["output_format"] not in OUTPUT_FORMATS:
        return "output_format must be one of jpg, png"
    if "safety_tolerance" in payload:
        value = payload["safety_tolerance"]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2:
            return "safety_tolerance must be an integer between 0 and 2"
    if "seed" in payload:
        value = payload["seed"]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
            return f"seed must be an integer between 0 and {SEED_MAX}"
    return None


def html_page(status: int, message: str) -> str:
    return (
        f"<html><head><title>{status} {message}</title></head>"
        f"<body><center><h1>{status} {message}</h1></center><hr><center>nginx</center>"
        "</body></html>"
    )
