"""From a parsed OpenVPN config to the protocol layer's settings.

The probe, the client daemon and the server daemon all start from the same
directives (ca/cert/key/crl-verify/verify-x509-name/remote-cert-tls,
data-ciphers, timers, credentials), so the mapping lives here once.
"""
from __future__ import annotations

from typing import Any

from bsd_ovpn.errors import ConfigError
from bsd_ovpn.proto.session import SessionSettings
from bsd_ovpn.proto.tls import TLSConfig, TLSConfigError


def tls_config_from(cfg: Any) -> Any:
    """TLSConfig from a parsed config's ca/cert/key/crl/verification directives.

    Every TLS directive the config parser accepts is passed on here
    (remote-cert-tls/-eku, verify-x509-name, verify-client-cert,
    tls-version-min/-max, tls-cipher, tls-ciphersuites, tls-groups): one that
    stopped at the parser would be silently ignored.  ``tls-version-min 1.0``
    / ``1.1`` become 1.2, the oldest version bsd_ovpn speaks.
    """
    if cfg.ca is None:
        raise ConfigError("no ca given (ca file or <ca> block)", cfg.path)
    cert = cfg.cert.read() if cfg.cert is not None else None
    if cert is not None and cfg.extra_certs is not None:
        cert = cert + "\n" + cfg.extra_certs.read()
    vxn = None
    if cfg.verify_x509_name is not None:
        vxn = (cfg.verify_x509_name.name, cfg.verify_x509_name.type)
    tls_min = (cfg.tls_version_min or "1.2").split()[0]
    try:
        return TLSConfig(ca=cfg.ca.read(), cert=cert,
                         key=cfg.key.read() if cfg.key is not None else None,
                         crl=[cfg.crl_verify.read()] if cfg.crl_verify is not None else (),
                         verify_x509_name=vxn, remote_cert_tls=cfg.remote_cert_tls,
                         tls_version_min=tls_min if tls_min in ("1.2", "1.3") else "1.2",
                         verify_client_cert=cfg.verify_client_cert,
                         remote_cert_eku=cfg.remote_cert_eku,
                         tls_version_max=cfg.tls_version_max, tls_cipher=cfg.tls_cipher,
                         tls_ciphersuites=cfg.tls_ciphersuites, tls_groups=cfg.tls_groups)
    except TLSConfigError as exc:
        raise ConfigError(str(exc), cfg.path) from None


def client_settings_from(cfg: Any) -> SessionSettings:
    """Session settings of a client config (everything but the wrap and the remote)."""
    if cfg.is_server:
        raise ConfigError("a client config is needed here (this one is a server config)", cfg.path)
    username = password = None
    if cfg.auth_user_pass is not None:
        username, password = cfg.auth_user_pass.username, cfg.auth_user_pass.password
        if username is None or password is None:
            raise ConfigError("auth-user-pass needs a file with username and password "
                              "(nothing can ask for them interactively)", cfg.path)
    ping, ping_restart = float(cfg.ping), float(cfg.ping_restart)
    if cfg.keepalive is not None:
        ping, ping_restart = float(cfg.keepalive[0]), float(cfg.keepalive[1])
    return SessionSettings(
        server=False, tls=tls_config_from(cfg), data_ciphers=tuple(cfg.data_ciphers),
        data_ciphers_fallback=cfg.data_ciphers_fallback, hand_window=float(cfg.hand_window),
        reneg_sec=float(cfg.reneg_sec), tran_window=float(cfg.tran_window),
        tls_timeout=float(cfg.tls_timeout), username=username, password=password,
        tls_auth_keydir=(cfg.tls_auth.direction if cfg.tls_auth is not None else None),
        pull=cfg.pull or cfg.client, ping=ping, ping_restart=ping_restart)
