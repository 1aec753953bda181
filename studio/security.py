"""Security answers that do not belong to one area: the headers of responses that skip Django's
middleware (the Gradio mount), how media files are served, and the sign-in lockout answer.

Django's own pages get their Content-Security-Policy from django-csp and the rest from
SecurityMiddleware (settings.py). The Gradio page is a separate ASGI app mounted beside Django
(studio.synthesis.page), so `SecurityHeaders` adds the same headers at the ASGI edge to every
HTTP response that does not already carry them.
"""

from __future__ import annotations

from pathlib import Path

from django.http import FileResponse, HttpResponse, JsonResponse

# Gradio's page boots from an inline script and styles its components inline; everything
# else stays as strict as the studio's own pages: nothing from another origin, no plugins,
# no framing, forms only to the studio.
GRADIO_CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "media-src 'self' data: blob:",
        "connect-src 'self'",
        "font-src 'self' data:",
        "worker-src 'self' blob:",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

# An uploaded file is data, never a page: no script, no plugin, no framing, and `sandbox`
# makes it an opaque origin even if a browser did render it.
MEDIA_CSP = "default-src 'none'; media-src 'self'; sandbox; frame-ancestors 'none'"

BASE_HEADERS = {
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"same-origin",
    b"cross-origin-opener-policy": b"same-origin",
}

# What soundfile reports for a file it decoded -> the only content types audio is served as.
AUDIO_CONTENT_TYPES = {
    "WAV": ("audio/wav", "wav"),
    "WAVEX": ("audio/wav", "wav"),
    "FLAC": ("audio/flac", "flac"),
    "OGG": ("audio/ogg", "ogg"),
    "MP3": ("audio/mpeg", "mp3"),
    "AIFF": ("audio/aiff", "aiff"),
}


class SecurityHeaders:
    """ASGI: add the studio's security headers to HTTP responses that lack them.

    Django's responses already carry them (middleware), so only what bypasses Django (the
    Gradio mount, the body-size refusal) is changed.
    """

    def __init__(self, app, csp: str = GRADIO_CSP):
        self.app = app
        self.headers = {**BASE_HEADERS, b"content-security-policy": csp.encode()}
        # Files Gradio serves (uploads, results) are data like any media: no script at all.
        self.file_headers = {**BASE_HEADERS, b"content-security-policy": MEDIA_CSP.encode()}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = self.file_headers if "/file=" in path or "/stream/" in path else self.headers

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in headers.items() if k not in present]
                if extra:
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def audio_file_response(path: Path, filename_stem: str) -> FileResponse | None:
    """The file as a download of its real audio type, or None if it does not decode as audio.

    The type comes from what libsndfile reads in the file, never from its name: a file called
    x.wav that holds HTML is not audio, and is not served.
    """
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError, OSError):
        return None
    kind = AUDIO_CONTENT_TYPES.get(info.format)
    if kind is None or info.frames <= 0 or info.samplerate <= 0:
        return None
    content_type, suffix = kind
    response = FileResponse(
        path.open("rb"),
        content_type=content_type,
        as_attachment=True,  # an <audio> element plays it all the same
        filename=f"{filename_stem}.{suffix}",
    )
    harden_media(response)
    return response


def harden_media(response: HttpResponse) -> HttpResponse:
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Security-Policy"] = MEDIA_CSP
    response["Cross-Origin-Resource-Policy"] = "same-origin"
    return response


def lockout_response(request, *args, **kwargs) -> HttpResponse:
    """django-axes' answer once a username + address pair has failed too often: 429, in JSON
    for the API and as plain text for the sign-in page, with when to try again."""
    from django.conf import settings

    minutes = max(1, round(settings.AXES_COOLOFF_TIME.total_seconds() / 60))
    message = (
        f"Too many failed sign-ins for this account from your address; try again in "
        f"{minutes} minutes, or ask an admin to unlock it (python manage.py axes_reset)."
    )
    if request.path.startswith("/api/"):
        response: HttpResponse = JsonResponse({"error": message}, status=429)
    else:
        response = HttpResponse(message + "\n", status=429, content_type="text/plain")
    response["Retry-After"] = str(minutes * 60)
    return response
