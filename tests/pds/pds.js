// The reference PDS, configured from the environment (PDS_PORT, PDS_DID_PLC_URL, …).
const { PDS, envToCfg, envToSecrets, readEnv } = require('@atproto/pds');
(async () => {
  const env = readEnv();
  const pds = await PDS.create(envToCfg(env), envToSecrets(env));
  await pds.start();
  console.log(`PDS ${env.port}`);
})().catch((e) => { console.error(e); process.exit(1); });
