"""JWT verification and minting (the HTTP-level attack table is in test_auth_middleware.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pydantic import SecretStr, ValidationError

from llmserve.auth.jwt import JwtVerifier, mint_token
from llmserve.config import JwtConfig
from llmserve.errors import AuthenticationFailed, ConfigError

SECRET = "s3cr3t-" + "k" * 40


def hs_config(**overrides: object) -> JwtConfig:
    return JwtConfig(algorithms=["HS256"], secret=SecretStr(SECRET), **overrides)


def refused(verifier: JwtVerifier, token: str) -> AuthenticationFailed:
    with pytest.raises(AuthenticationFailed) as info:
        verifier.verify(token)
    return info.value


def test_minted_token_maps_claims_to_the_principal() -> None:
    config = hs_config(issuer="iss.test", audience="llmserve", admin_claim="adm")
    token = mint_token(config, "user-7", tier="pro", models=["m1", "m2"], ttl_seconds=60)
    verified = JwtVerifier(config).verify(token)
    p = verified.principal
    assert (p.id, p.tier, p.models, p.kind, p.admin) == (
        "jwt:user-7", "pro", frozenset({"m1", "m2"}), "jwt", False
    )  # fmt: skip
    assert verified.expires == pytest.approx(time.time() + 60, abs=2)


def test_admin_claim_only_counts_when_configured_and_true() -> None:
    claims = {"sub": "u", "exp": int(time.time()) + 60, "adm": True}
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    assert JwtVerifier(hs_config(admin_claim="adm")).verify(token).principal.admin is True
    assert JwtVerifier(hs_config()).verify(token).principal.admin is False


def test_models_claim_accepts_a_scope_string_and_refuses_other_types() -> None:
    verifier = JwtVerifier(hs_config())
    exp = int(time.time()) + 60
    token = jwt.encode({"sub": "u", "exp": exp, "models": "a b,c"}, SECRET, algorithm="HS256")
    assert verifier.verify(token).principal.models == frozenset({"a", "b", "c"})
    bad = jwt.encode({"sub": "u", "exp": exp, "models": 3}, SECRET, algorithm="HS256")
    assert refused(verifier, bad).code == "invalid_token"


def test_unknown_tier_is_refused_when_tiers_are_known() -> None:
    token = mint_token(hs_config(), "u", tier="platinum")
    assert refused(JwtVerifier(hs_config(), known_tiers={"free"}), token).code == "invalid_token"
    assert JwtVerifier(hs_config()).verify(token).principal.tier == "platinum"


def test_missing_subject_is_refused() -> None:
    token = jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    error = refused(JwtVerifier(hs_config()), token)
    assert error.code == "invalid_token" and "sub" in error.message


def test_leeway_accepts_small_skew_and_not_more() -> None:
    now = int(time.time())
    verifier = JwtVerifier(hs_config(leeway_seconds=30))
    slightly = jwt.encode({"sub": "u", "exp": now - 10}, SECRET, algorithm="HS256")
    assert verifier.verify(slightly).principal.id == "jwt:u"
    long_ago = jwt.encode({"sub": "u", "exp": now - 60}, SECRET, algorithm="HS256")
    assert refused(verifier, long_ago).code == "token_expired"
    future_iat = jwt.encode({"sub": "u", "exp": now + 600, "iat": now + 300}, SECRET, "HS256")
    assert refused(verifier, future_iat).code == "token_not_yet_valid"


def test_audience_in_token_is_ignored_when_none_is_configured() -> None:
    token = jwt.encode({"sub": "u", "exp": int(time.time()) + 60, "aud": "x"}, SECRET, "HS256")
    assert JwtVerifier(hs_config()).verify(token).principal.id == "jwt:u"


def test_missing_issuer_is_refused_when_configured() -> None:
    token = jwt.encode({"sub": "u", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    error = refused(JwtVerifier(hs_config(issuer="iss.test")), token)
    assert error.code == "invalid_token" and "iss" in error.message


def _es256_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    private = ec.generate_private_key(ec.SECP256R1())
    private_file = tmp_path / "es.pem"
    private_file.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public_file = tmp_path / "es.pub"
    public_file.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "ES256"}]}))
    return private_file, public_file, jwks_file


def test_es256_with_public_key_file_and_with_jwks(tmp_path: Path) -> None:
    private_file, public_file, jwks_file = _es256_files(tmp_path)
    by_file = JwtConfig(
        algorithms=["ES256"], public_key_file=public_file, private_key_file=private_file
    )
    token = mint_token(by_file, "u")
    assert JwtVerifier(by_file).verify(token).principal.id == "jwt:u"
    by_jwks = JwtConfig(algorithms=["ES256"], jwks_file=jwks_file)
    assert JwtVerifier(by_jwks).verify(token).principal.id == "jwt:u"  # no kid, single key
    pem = private_file.read_bytes()
    exp = int(time.time()) + 60
    with_kid = jwt.encode({"sub": "v", "exp": exp}, pem, "ES256", headers={"kid": "k1"})
    assert JwtVerifier(by_jwks).verify(with_kid).principal.id == "jwt:v"
    other_kid = jwt.encode({"sub": "v", "exp": exp}, pem, "ES256", headers={"kid": "k2"})
    assert refused(JwtVerifier(by_jwks), other_kid).code == "invalid_token"


def test_config_refuses_mixed_families() -> None:
    with pytest.raises(ValidationError, match="algorithm confusion"):
        JwtConfig(algorithms=["RS256", "HS256"])


def test_missing_key_material_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"auth\.jwt\.secret"):
        JwtVerifier(JwtConfig(algorithms=["HS256"]))
    with pytest.raises(ConfigError, match="public_key_file or jwks_file"):
        JwtVerifier(JwtConfig(algorithms=["RS256"]))
    with pytest.raises(ConfigError, match="cannot read"):
        JwtVerifier(JwtConfig(algorithms=["RS256"], public_key_file=tmp_path / "nope.pem"))
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        JwtVerifier(JwtConfig(algorithms=["RS256"], public_key_file=tmp_path / "bad.pem"))
    with pytest.raises(ConfigError, match="private_key_file"):
        mint_token(JwtConfig(algorithms=["RS256"]), "u")


def test_an_hmac_secret_shorter_than_32_bytes_is_a_config_error():
    with pytest.raises(ValidationError, match="at least 32 bytes"):
        JwtConfig(algorithms=["HS256"], secret="short-secret")
    assert JwtConfig(algorithms=["HS256"], secret="s" * 32).secret is not None


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
def test_numeric_claims_of_another_type_are_refused(claim: str) -> None:
    claims: dict[str, object] = {"sub": "u", "exp": int(time.time()) + 60}
    claims[claim] = "9999999999" if claim == "exp" else str(int(time.time()) - 10)
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    error = refused(JwtVerifier(hs_config()), token)
    assert error.code == "invalid_token" and claim in error.message
    claims[claim] = True
    assert refused(JwtVerifier(hs_config()), jwt.encode(claims, SECRET, algorithm="HS256"))


def test_allowed_tiers_bound_what_a_token_may_claim() -> None:
    tiers = {"free", "pro", "unlimited"}
    verifier = JwtVerifier(hs_config(allowed_tiers=["free", "pro"]), known_tiers=tiers)
    assert verifier.verify(mint_token(hs_config(), "u", tier="pro")).principal.tier == "pro"
    error = refused(verifier, mint_token(hs_config(), "u", tier="unlimited"))
    assert "may not claim" in error.message


def test_verified_token_carries_what_revocation_needs() -> None:
    now = int(time.time())
    claims = {"sub": "user-7", "iat": now - 5, "exp": now + 60, "jti": "tok-1"}
    verified = JwtVerifier(hs_config()).verify(jwt.encode(claims, SECRET, algorithm="HS256"))
    assert (verified.subject, verified.token_id, verified.issued_at) == ("user-7", "tok-1", now - 5)
    bare = jwt.encode({"sub": "u", "exp": now + 60}, SECRET, algorithm="HS256")
    plain = JwtVerifier(hs_config()).verify(bare)
    assert (plain.token_id, plain.issued_at) == (None, None)
    minted = JwtVerifier(hs_config()).verify(mint_token(hs_config(), "u"))
    assert minted.token_id is not None and len(minted.token_id) == 16  # minted tokens have one


def test_max_lifetime_refuses_longer_tokens_and_tokens_without_iat() -> None:
    verifier = JwtVerifier(hs_config(max_lifetime_seconds=3600))
    now = int(time.time())

    def signed(**claims: object) -> str:
        return jwt.encode({"sub": "u", **claims}, SECRET, algorithm="HS256")

    assert verifier.verify(signed(iat=now, exp=now + 3600)).subject == "u"
    assert refused(verifier, signed(iat=now, exp=now + 3601)).code == "invalid_token"
    assert refused(verifier, signed(exp=now + 60)).code == "invalid_token"  # no iat: unbounded
    assert JwtVerifier(hs_config()).verify(signed(iat=now, exp=now + 10**6)).subject == "u"


def test_a_public_key_verifies_only_the_algorithms_its_type_fits(tmp_path: Path) -> None:
    private_file, public_file, _ = _es256_files(tmp_path)
    with pytest.raises(ConfigError, match="none of the algorithms"):
        JwtVerifier(JwtConfig(algorithms=["RS256"], public_key_file=public_file))
    both = JwtConfig(algorithms=["RS256", "ES256"], public_key_file=public_file,
                     private_key_file=private_file)  # fmt: skip
    verifier = JwtVerifier(both)
    pem = private_file.read_bytes()
    es256 = jwt.encode({"sub": "u", "exp": int(time.time()) + 60}, pem, "ES256")
    assert verifier.verify(es256).principal.id == "jwt:u"
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rs256 = jwt.encode({"sub": "u", "exp": int(time.time()) + 60}, rsa_key, "RS256")
    assert refused(verifier, rs256).code == "invalid_token"  # not a TypeError from pyjwt


def test_eddsa_tokens_with_a_public_key_file(tmp_path: Path) -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "ed.pem").write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))  # fmt: skip
    (tmp_path / "ed.pub").write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    config = JwtConfig(algorithms=["EdDSA"], public_key_file=tmp_path / "ed.pub",
                       private_key_file=tmp_path / "ed.pem")  # fmt: skip
    assert JwtVerifier(config).verify(mint_token(config, "ed")).principal.id == "jwt:ed"
