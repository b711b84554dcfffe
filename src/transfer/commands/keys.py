"""``transfer keygen`` and ``transfer sign``: Ed25519 keys for signed bundles (the ``--trust`` /
``--trust-pickle`` options of the commands that load bundles are
:class:`transfer.runtime.predict_config.TrustOptions`)."""

from __future__ import annotations

import click


@click.command("keygen")
@click.argument("key", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace KEY and KEY.pub if they exist.")
def keygen(key, force) -> None:
    """Make an Ed25519 key pair for signing bundles: KEY (private, mode 0600; encrypted when
    TRANSFER_KEY_PASSPHRASE is set) and KEY.pub (give it to the machines that load bundles).

    \b
    transfer keygen release.key
    transfer export runs/digits --sign release.key
    transfer infer runs/digits/bundle images/ --trust release.key.pub     (or TRANSFER_TRUST=release.key.pub)
    """
    from ..signing import generate_key

    priv, pub, kid = generate_key(key, force=force)
    click.echo(f"{kid}: private key {priv} (keep it secret), public key {pub}")


@click.command("sign")
@click.argument("bundle", type=click.Path())
@click.option("--key", required=True, type=click.Path(dir_okay=False), help="Private key from `transfer keygen`.")
def sign_cmd(bundle, key) -> None:
    """Sign an exported bundle with KEY (writes BUNDLE/signature.json). The bundle is checked
    first, as `transfer verify` does: a damaged or edited bundle is never signed.

    \b
    transfer sign runs/digits/bundle --key release.key
    """
    from ..bundle import check_graphs, load_bundle
    from ..bundle_write import sign_bundle
    from ..errors import TamperedBundleError
    from ..runtime.sessions import light_session
    from ..signing import load_signing_key

    k = load_signing_key(key)
    b = load_bundle(bundle, trust=False)
    problems = check_graphs(b, light_session)
    if problems:
        raise TamperedBundleError(f"bundle {bundle} does not match its manifest: "
                                  + "; ".join(f"{p['file']}: {p['problem']}" for p in problems),
                                  hint="re-export the bundle; only a bundle that checks out is signed")
    kid = sign_bundle(bundle, k)
    click.echo(f"{bundle}: signed by {kid}")


COMMANDS = [keygen, sign_cmd]
