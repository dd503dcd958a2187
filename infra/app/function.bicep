// The gateway: a Python 3.11 Function App on Flex Consumption (FC1).
// Host storage, deployment storage, App Insights, Azure OpenAI and Table Storage are all reached with the
// user-assigned identity; the app has no connection strings with keys and no storage keys at all.
// Every name in gateway_lib.settings.SETTING_NAMES appears below (tests/unit/test_infra.py holds them
// together with local.settings.example.json).
param name string
param planName string
param location string
param tags object = {}

param identityId string
param identityClientId string
param storageAccountName string
param deploymentContainerUrl string
param appInsightsConnectionString string
@description('Key Vault secret URI of the alert webhook URL; empty for none.')
param alertWebhookSecretUri string = ''

@allowed(['dev', 'test', 'prod'])
param gatewayEnvironment string
@description('Catalogue JSON; empty = the catalogue packaged with the app.')
param gatewayModels string = ''
@description('Tier policy JSON; empty = the tiers packaged with the app.')
param gatewayTiers string = ''
param gatewayTablePrefix string = 'gw'
param piiPatterns string = ''
@description('JSON list of regexes; a match is a 400 content_filter.')
param denyPatterns string = ''
@minValue(1)
@maxValue(230)
@description('Provider call budget; at most 230 s, the HTTP response limit of the Functions front end.')
param upstreamTimeoutSeconds int = 120

param authTenantIds string
param authAudiences string
param authAllowedTenants string = ''
param authExtraIssuers string = ''
param authOpenIdConfigUrl string = ''

param azureOpenAiEndpoint string
param azureOpenAiApiVersion string = '2024-10-21'

param bedrockRegion string = 'us-east-1'
param awsRoleArn string = ''
param awsWebIdentityAudience string = ''
@description('App settings of providers this template has no parameters for: { NAME: value }, a secret as a Key Vault reference (@Microsoft.KeyVault(SecretUri=...)).')
param providerSettings object = {}

@allowed(['strict', 'leased'])
@description('GATEWAY_QUOTA_MODE: strict (reserve and settle per request) or leased (quota in blocks, usage written behind).')
param quotaMode string = 'strict'
@allowed(['none', 'block', 'downgrade'])
param budgetEnforcement string = 'none'
param budgetDowngradeAlias string = ''
param budgetAlertThresholds string = '50,80,100'

@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 100
@allowed([512, 2048, 4096])
param instanceMemoryMB int = 2048
@description('Always-ready instances for the HTTP group (0 = scale to zero, cold starts allowed).')
param alwaysReadyInstances int = 0
@description('Concurrent HTTP requests per instance. Python defaults to 1 on Flex; the gateway is async and I/O bound.')
param httpPerInstanceConcurrency int = 16

resource plan 'Microsoft.Web/serverfarms@2024-11-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    tier: 'FlexConsumption'
    name: 'FC1'
  }
  properties: {
    reserved: true
  }
}

var awsEnabled = !empty(awsRoleArn)

var gatewayAppSettings = [
  // --- Functions host (platform) ---
  { name: 'AzureWebJobsStorage__accountName', value: storageAccountName }
  { name: 'AzureWebJobsStorage__credential', value: 'managedidentity' }
  { name: 'AzureWebJobsStorage__clientId', value: identityClientId }
  { name: 'PYTHON_ENABLE_INIT_INDEXING', value: '1' } // HTTP streams (azurefunctions-extensions-http-fastapi)
  { name: 'APPLICATIONINSIGHTS_CONNECTION_STRING', value: appInsightsConnectionString }
  // App Insights has local auth disabled: the host authenticates ingestion with the identity.
  { name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING', value: 'ClientId=${identityClientId};Authorization=AAD' }

  // --- Gateway ---
  { name: 'GATEWAY_ENVIRONMENT', value: gatewayEnvironment }
  { name: 'GATEWAY_MODELS', value: gatewayModels }
  { name: 'GATEWAY_TIERS', value: gatewayTiers }
  { name: 'GATEWAY_MAX_BODY_BYTES', value: '1048576' }
  { name: 'GATEWAY_MAX_PROMPT_CHARS', value: '400000' }
  { name: 'GATEWAY_MAX_MESSAGES', value: '256' }
  { name: 'GATEWAY_DENY_PATTERNS', value: denyPatterns }
  { name: 'GATEWAY_PII_PATTERNS', value: piiPatterns }
  { name: 'GATEWAY_UPSTREAM_TIMEOUT_SECONDS', value: string(upstreamTimeoutSeconds) }
  { name: 'GATEWAY_CONNECT_TIMEOUT_SECONDS', value: '5' }

  { name: 'AUTH_TENANT_IDS', value: authTenantIds }
  { name: 'AUTH_ALLOWED_TENANTS', value: authAllowedTenants }
  { name: 'AUTH_AUDIENCES', value: authAudiences }
  { name: 'AUTH_EXTRA_ISSUERS', value: authExtraIssuers }
  { name: 'AUTH_OPENID_CONFIG_URL', value: authOpenIdConfigUrl } // empty: the first tenant's
  { name: 'AUTH_JWKS_URL', value: '' } // discovered from the OpenID configuration
  { name: 'AUTH_ALGORITHMS', value: 'RS256' }
  { name: 'AUTH_LEEWAY_SECONDS', value: '60' }
  { name: 'AUTH_JWKS_CACHE_TTL_SECONDS', value: '3600' }
  { name: 'AUTH_JWKS_MIN_REFRESH_SECONDS', value: '60' }

  { name: 'AZURE_CLIENT_ID', value: identityClientId }
  { name: 'AZURE_OPENAI_ENDPOINT', value: azureOpenAiEndpoint }
  { name: 'AZURE_OPENAI_API_VERSION', value: azureOpenAiApiVersion }
  { name: 'AZURE_OPENAI_AUTH', value: 'managed_identity' }
  { name: 'AZURE_OPENAI_API_KEY', value: '' } // never in Azure: settings refuses api_key auth there
  { name: 'AZURE_OPENAI_TOKEN_SCOPE', value: 'https://cognitiveservices.azure.com/.default' }

  { name: 'BEDROCK_REGION', value: bedrockRegion }
  { name: 'BEDROCK_ENDPOINT_URL', value: '' }
  { name: 'AWS_ROLE_ARN', value: awsRoleArn }
  // The pair goes together (settings cross-check): no role, no audience.
  { name: 'AWS_WEB_IDENTITY_AUDIENCE', value: awsEnabled ? awsWebIdentityAudience : '' }
  // Regional STS: no dependency on the global us-east-1 endpoint, lower latency.
  { name: 'AWS_STS_ENDPOINT_URL', value: awsEnabled ? 'https://sts.${bedrockRegion}.amazonaws.com' : '' }
  { name: 'AWS_ROLE_SESSION_NAME', value: 'ai-gateway-${gatewayEnvironment}' }

  { name: 'GATEWAY_STORAGE_MODE', value: 'table' }
  { name: 'GATEWAY_STORAGE_CONNECTION_STRING', value: '' } // local/Azurite only
  { name: 'GATEWAY_TABLE_ENDPOINT', value: 'https://${storageAccountName}.table.${environment().suffixes.storage}' }
  { name: 'GATEWAY_TABLE_PREFIX', value: gatewayTablePrefix }
  { name: 'GATEWAY_QUOTA_MODE', value: quotaMode }

  { name: 'BUDGET_ROLLUP_SCHEDULE', value: '0 */5 * * * *' }
  { name: 'BUDGET_ALERT_THRESHOLDS', value: budgetAlertThresholds }
  { name: 'BUDGET_ENFORCEMENT', value: budgetEnforcement }
  { name: 'BUDGET_DOWNGRADE_ALIAS', value: budgetDowngradeAlias }
  { name: 'BUDGET_ROLLUP_MAX_ROWS', value: '5000' }
  {
    name: 'ALERT_WEBHOOK_URL'
    value: empty(alertWebhookSecretUri) ? '' : '@Microsoft.KeyVault(SecretUri=${alertWebhookSecretUri})'
  }
]

// A provider added after this template is configured without editing it (docs/configuration.md).
var providerAppSettings = [for setting in items(providerSettings): { name: setting.key, value: string(setting.value) }]

resource site 'Microsoft.Web/sites@2024-11-01' = {
  name: name
  location: location
  tags: union(tags, { 'azd-service-name': 'api' })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientCertEnabled: false
    publicNetworkAccess: 'Enabled'
    keyVaultReferenceIdentity: identityId
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: deploymentContainerUrl
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
        alwaysReady: alwaysReadyInstances > 0 ? [
          {
            name: 'http'
            instanceCount: alwaysReadyInstances
          }
        ] : []
        triggers: {
          http: {
            perInstanceConcurrency: httpPerInstanceConcurrency
          }
        }
      }
      // Flex Consumption always runs the current 4.x host (>= 4.34.1, which HTTP streams need); the
      // runtime is chosen here, not with FUNCTIONS_WORKER_RUNTIME / FUNCTIONS_EXTENSION_VERSION, which
      // Flex rejects as app settings.
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      appSettings: concat(gatewayAppSettings, providerAppSettings)
    }
  }
}

// Deployments use Entra (the deploy script's az login) and the identity-based deployment container: basic
// (user/password) publishing credentials for SCM and FTP have no user, so they are switched off.
resource scmBasicAuth 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-11-01' = {
  parent: site
  name: 'scm'
  properties: {
    allow: false
  }
}

resource ftpBasicAuth 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-11-01' = {
  parent: site
  name: 'ftp'
  properties: {
    allow: false
  }
}

output id string = site.id
output name string = site.name
output defaultHostName string = site.properties.defaultHostName
output url string = 'https://${site.properties.defaultHostName}'
