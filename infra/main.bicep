// AI gateway: Function App (Flex Consumption) behind API Management, keyless everywhere.
// azd-style layout: this file composes infra/app/*.bicep; each module owns one concern.
//   az deployment sub create -l <region> -f infra/main.bicep -p infra/main.parameters.dev.json
// (scripts/deploy.sh wraps what-if, create and publish.)
targetScope = 'subscription'

@minLength(1)
@maxLength(32)
@description('Environment name (e.g. aigw-dev); seeds the resource group and the unique resource names.')
param environmentName string

@minLength(1)
@description('Region for all resources; must offer Flex Consumption.')
param location string

param resourceGroupName string = ''

@allowed(['dev', 'test', 'prod'])
@description('GATEWAY_ENVIRONMENT of the function app.')
param gatewayEnvironment string

// --- Caller authentication (Entra ID) ---
@description('Comma-separated Entra tenant ids whose tokens are accepted (AUTH_TENANT_IDS).')
param authTenantIds string
@description('Comma-separated exact token issuers trusted besides the tenants\' own (AUTH_EXTRA_ISSUERS), e.g. a sovereign cloud.')
param authExtraIssuers string = ''
@description('OpenID configuration whose keys sign the tokens (AUTH_OPENID_CONFIG_URL); empty: the tenants\' public-cloud ones.')
param authOpenIdConfigUrl string = ''
@description('Comma-separated allow-list on the token tenant claim, tid (AUTH_ALLOWED_TENANTS); empty: the tenants in authTenantIds.')
param authAllowedTenants string = ''
@description('The gateway app registration ID URI, e.g. api://ai-gateway.')
param gatewayAppIdUri string
@description('The gateway app registration client id (audience of v2 tokens).')
param gatewayAppClientId string
@description('APIM allow-list of client application ids: "*" or a comma-separated list.')
param allowedClientAppIds string = '*'

// --- Providers ---
@description('Azure OpenAI endpoint, e.g. https://my-aoai.openai.azure.com/')
param azureOpenAiEndpoint string
@description('Azure OpenAI data-plane API version (AZURE_OPENAI_API_VERSION).')
param azureOpenAiApiVersion string = '2024-10-21'
@description('Existing Azure OpenAI accounts the gateway may call: [{ name, resourceGroup }].')
param azureOpenAiAccounts array = []
param bedrockRegion string = 'us-east-1'
@description('ARN of the AWS role assumed with web identity (infra/aws); empty disables Bedrock.')
param awsRoleArn string = ''
@description('App ID URI the managed identity requests a token for; the AWS role trusts it as aud.')
param awsWebIdentityAudience string = ''
@description('App settings of providers without parameters here, e.g. { OPENAI_COMPATIBLE_BASE_URL: \'https://api.openai.com/v1\', OPENAI_COMPATIBLE_API_KEY: \'@Microsoft.KeyVault(SecretUri=...)\' }.')
param providerSettings object = {}

// --- Gateway behaviour ---
param gatewayModels string = ''
param gatewayTiers string = ''
param piiPatterns string = ''
@description('JSON list of regexes (GATEWAY_DENY_PATTERNS); a match is a 400 content_filter. Empty: none.')
param denyPatterns string = ''
@minValue(1)
@maxValue(230)
@description('Provider call budget in seconds (GATEWAY_UPSTREAM_TIMEOUT_SECONDS); at most 230 s, the HTTP response limit of the Functions front end.')
param upstreamTimeoutSeconds int = 120
@allowed(['strict', 'leased'])
@description('Quota admission (docs/storage.md, ADR 0007): strict writes each cost row before answering; leased takes quota in blocks and writes usage behind (<= 0.05 s of cost rows at risk on a hard crash).')
param quotaMode string = 'strict'
@allowed(['none', 'block', 'downgrade'])
param budgetEnforcement string = 'none'
param budgetDowngradeAlias string = ''
param budgetAlertThresholds string = '50,80,100'
@secure()
@description('Alert webhook URL (kept in Key Vault); pass it when storing or rotating it, empty otherwise.')
param alertWebhookUrl string = ''
@description('Whether the app reads the webhook secret from Key Vault. Not derived from alertWebhookUrl: a redeploy that does not pass the secret must keep the setting (it would blank it and silence alerts).')
param alertWebhookEnabled bool = false

// --- Scale ---
param maximumInstanceCount int = 100
param instanceMemoryMB int = 2048
param alwaysReadyInstances int = 0
param httpPerInstanceConcurrency int = 16
@allowed(['Standard_LRS', 'Standard_ZRS', 'Standard_GRS', 'Standard_GZRS'])
param storageSku string = 'Standard_GZRS'

// --- API Management ---
@description('false on the first pass of deploy.sh: the function host must run code before its keys can be read.')
param deployApim bool = true
@allowed(['Developer', 'BasicV2', 'StandardV2', 'Standard', 'Premium'])
param apimSku string = 'StandardV2'
param apimPublisherEmail string
param apimPublisherName string
param apimRateLimitCalls int = 600
param apimQuotaCallsPerDay int = 200000

@description('Optional operator principal (object id) given table data access for debugging.')
param operatorPrincipalId string = ''

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
  workload: 'ai-gateway'
  environment: gatewayEnvironment
}
var tablePrefix = 'gw'
var functionAppName = 'func-${environmentName}-${resourceToken}'
var deploymentContainerName = 'app-package-${take(resourceToken, 7)}'

resource rg 'Microsoft.Resources/resourceGroups@2024-11-01' = {
  name: !empty(resourceGroupName) ? resourceGroupName : 'rg-${environmentName}'
  location: location
  tags: tags
}

module gatewayIdentity 'app/identity.bicep' = {
  name: 'gateway-identity'
  scope: rg
  params: {
    name: 'id-gateway-${resourceToken}'
    location: location
    tags: tags
  }
}

module apimIdentity 'app/identity.bicep' = {
  name: 'apim-identity'
  scope: rg
  params: {
    name: 'id-apim-${resourceToken}'
    location: location
    tags: tags
  }
}

module storage 'app/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: 'st${resourceToken}'
    location: location
    tags: tags
    skuName: storageSku
    deploymentContainerName: deploymentContainerName
    tableNames: [
      '${tablePrefix}usage'
      '${tablePrefix}overrides'
      '${tablePrefix}callers'
      '${tablePrefix}rollup'
      '${tablePrefix}alerts'
      '${tablePrefix}responses'
    ]
  }
}

module monitoring 'app/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: 'log-${resourceToken}'
    applicationInsightsName: 'appi-${resourceToken}'
    location: location
    tags: tags
  }
}

module keyVault 'app/keyvault.bicep' = {
  name: 'keyvault'
  scope: rg
  params: {
    name: 'kv-${resourceToken}'
    location: location
    tags: tags
    alertWebhookUrl: alertWebhookUrl
    alertWebhookEnabled: alertWebhookEnabled || !empty(alertWebhookUrl)
  }
}

module rbac 'app/rbac.bicep' = {
  name: 'rbac'
  scope: rg
  params: {
    storageAccountName: storage.outputs.name
    appInsightsName: monitoring.outputs.applicationInsightsName
    keyVaultName: keyVault.outputs.name
    gatewayPrincipalId: gatewayIdentity.outputs.principalId
    apimPrincipalId: apimIdentity.outputs.principalId
    operatorPrincipalId: operatorPrincipalId
  }
}

module openAiAccess 'app/rbac-openai.bicep' = [for account in azureOpenAiAccounts: {
  name: 'rbac-openai-${account.name}'
  scope: resourceGroup(account.resourceGroup)
  params: {
    accountName: account.name
    principalId: gatewayIdentity.outputs.principalId
  }
}]

module function 'app/function.bicep' = {
  name: 'function'
  scope: rg
  params: {
    name: functionAppName
    planName: 'plan-${resourceToken}'
    location: location
    tags: tags
    identityId: gatewayIdentity.outputs.id
    identityClientId: gatewayIdentity.outputs.clientId
    storageAccountName: storage.outputs.name
    deploymentContainerUrl: storage.outputs.deploymentContainerUrl
    appInsightsConnectionString: monitoring.outputs.connectionString
    alertWebhookSecretUri: keyVault.outputs.alertWebhookSecretUri
    gatewayEnvironment: gatewayEnvironment
    gatewayModels: gatewayModels
    gatewayTiers: gatewayTiers
    gatewayTablePrefix: tablePrefix
    piiPatterns: piiPatterns
    denyPatterns: denyPatterns
    upstreamTimeoutSeconds: upstreamTimeoutSeconds
    authTenantIds: authTenantIds
    authAllowedTenants: authAllowedTenants
    authAudiences: '${gatewayAppIdUri},${gatewayAppClientId}'
    authExtraIssuers: authExtraIssuers
    authOpenIdConfigUrl: authOpenIdConfigUrl
    azureOpenAiEndpoint: azureOpenAiEndpoint
    azureOpenAiApiVersion: azureOpenAiApiVersion
    bedrockRegion: bedrockRegion
    awsRoleArn: awsRoleArn
    awsWebIdentityAudience: awsWebIdentityAudience
    providerSettings: providerSettings
    quotaMode: quotaMode
    budgetEnforcement: budgetEnforcement
    budgetDowngradeAlias: budgetDowngradeAlias
    budgetAlertThresholds: budgetAlertThresholds
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    alwaysReadyInstances: alwaysReadyInstances
    httpPerInstanceConcurrency: httpPerInstanceConcurrency
  }
  // The host reads storage with the identity at first start: grant the roles before the app exists.
  dependsOn: [rbac]
}

module apim 'app/apim.bicep' = if (deployApim) {
  name: 'apim'
  scope: rg
  params: {
    name: 'apim-${resourceToken}'
    location: location
    tags: tags
    skuName: apimSku
    publisherEmail: apimPublisherEmail
    publisherName: apimPublisherName
    identityId: apimIdentity.outputs.id
    identityClientId: apimIdentity.outputs.clientId
    functionAppName: function.outputs.name
    appInsightsId: monitoring.outputs.applicationInsightsId
    appInsightsConnectionString: monitoring.outputs.connectionString
    workspaceId: monitoring.outputs.workspaceId
    tenantIds: split(toLower(replace(authTenantIds, ' ', '')), ',')
    extraIssuers: split(replace(authExtraIssuers, ' ', ''), ',') // exact strings: case kept
    openIdConfigUrl: authOpenIdConfigUrl
    audience: gatewayAppIdUri
    audienceClientId: gatewayAppClientId
    allowedClientAppIds: allowedClientAppIds
    rateLimitCalls: apimRateLimitCalls
    quotaCalls: apimQuotaCallsPerDay
  }
  dependsOn: [rbac]
}

module diagnostics 'app/diagnostics.bicep' = {
  name: 'diagnostics'
  scope: rg
  params: {
    workspaceId: monitoring.outputs.workspaceId
    keyVaultName: keyVault.outputs.name
    storageAccountName: storage.outputs.name
    functionAppName: function.outputs.name
  }
}

module workbook 'app/workbook.bicep' = {
  name: 'workbook'
  scope: rg
  params: {
    location: location
    tags: tags
    displayName: 'AI Gateway (${environmentName})'
    appInsightsId: monitoring.outputs.applicationInsightsId
  }
}

output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_NAME string = function.outputs.name
output FUNCTION_APP_URL string = function.outputs.url
output FUNCTION_API_BASE_URL string = '${function.outputs.url}/api'
output GATEWAY_IDENTITY_CLIENT_ID string = gatewayIdentity.outputs.clientId
// The object id AWS trusts as `sub` (infra/aws/bedrock-web-identity-role.json).
output GATEWAY_IDENTITY_PRINCIPAL_ID string = gatewayIdentity.outputs.principalId
// apim is conditional: its outputs are read null-safely (BCP318), empty when it is not deployed.
output APIM_GATEWAY_URL string = apim.?outputs.gatewayUrl ?? ''
output CHAT_COMPLETIONS_URL string = deployApim ? '${apim.?outputs.apiBaseUrl ?? ''}/v1/chat/completions' : ''
